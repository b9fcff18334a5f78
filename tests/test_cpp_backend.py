"""The fused C++ CPU backend (``torch.ops.drople_fast.iwtd_cpu``) against the reference.

Skipped as a whole when ``drople_fast._C`` is not built
(``pip install --no-build-isolation -e .`` builds it).
"""
from __future__ import annotations

import math

import pytest
import torch

import drople_fast as df
from drople_fast.ops import library as ops
from drople_fast.ops.philox import token_uniform
from drople_fast.ops.primitives import fold_bridge
from drople_fast.ops.reference import iwtd_reference

from iwtd_harness import ODD_SHAPES, Case, assert_matches_reference, compile_and_compare, make_inputs, run

_MISSING = ops.cpp_extension_error()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"C++ extension not available: {_MISSING}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (causal, padded, anchor): vision-like, text-like (causal, padded, per-sample EOS anchor), padded vision.
VARIANTS = [(False, False, "first"), (True, True, "eos"), (False, True, "first"), (True, False, "eos")]


def _variant_id(v):
    causal, padded, anchor = v
    return f"{'causal' if causal else 'full'}-{'padded' if padded else 'dense'}-{anchor}"


def op_args(inputs: dict, seed: int | None = None, **overrides) -> tuple:
    """Positional arguments of the raw operator, built exactly as ``df.iwtd`` builds them."""
    inputs = {**inputs, **overrides}
    q = inputs["q"]
    B, _, S, _ = q.shape
    folded, shift = fold_bridge(inputs["bridge_tokens"], inputs["bridge_weight"], inputs["bridge_bias"])
    valid = inputs["valid"] if inputs["valid"] is not None else torch.ones(B, S, dtype=torch.bool)
    anchor = inputs["anchor_index"]
    anchor = torch.full((B,), anchor, dtype=torch.int64) if isinstance(anchor, int) else anchor.to(torch.int64)
    seed = inputs["seed"] if seed is None else seed
    return (q.contiguous(), inputs["k"].contiguous(), inputs["hidden"].contiguous(),
            inputs["eligible"].expand(B, S).contiguous(), valid.contiguous(), anchor.contiguous(),
            folded.contiguous(), shift.contiguous(), bool(inputs["causal"]), 0.1, 0.5,
            torch.tensor([seed], dtype=torch.int64))


# ---------------------------------------------------------------------------
# agreement with the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "B{}H{}S{}".format(*s))
def test_matches_reference_odd_shapes(shape, variant, dtype):
    B, H, S = shape
    causal, padded, anchor = variant
    case = Case(B, H, S, causal=causal, padded=padded, anchor=anchor, dtype=dtype, seed=S + 17)
    assert_matches_reference(make_inputs(case, generator_seed=B * 1000 + S), "cpp", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_realistic_vision_and_text_layers(dtype):
    vision = Case(2, 12, 197, Dh=64, D=768, M=64, P=512, dtype=dtype, seed=5)
    assert_matches_reference(make_inputs(vision), "cpp", dtype)
    text = Case(3, 8, 77, Dh=64, D=512, M=64, P=512, causal=True, padded=True, anchor="eos", dtype=dtype, seed=6)
    assert_matches_reference(make_inputs(text), "cpp", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_ineligible_sample(dtype):
    inputs = make_inputs(Case(5, 3, 23, padded=True, dtype=dtype, seed=3))
    inputs["eligible"] = inputs["eligible"].clone()
    inputs["eligible"][2] = False
    assert_matches_reference(inputs, "cpp", dtype)
    out = run(inputs, "cpp")
    assert not out.drop_mask[2].any()
    assert torch.all(out.drop_prob[2] == 0)
    valid = inputs["valid"]
    assert out.keep_count[2] == valid[2].sum()
    assert torch.equal(out.keep_order[2, : valid[2].sum()], torch.nonzero(valid[2]).flatten())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_all_equal_scores_give_p_max(dtype, causal):
    """Zero q, k and hidden make every score constant on C: the zero range counts as one, p = p_max on E."""
    case = Case(3, 2, 11, causal=causal, dtype=dtype, seed=9)
    inputs = make_inputs(case)
    for name in ("q", "k", "hidden"):
        inputs[name] = torch.zeros_like(inputs[name])
    if causal:
        # With a causal mask the rows differ (row j sees j + 1 keys); only the non-causal case is constant.
        assert_matches_reference(inputs, "cpp", dtype)
        return
    out = run(inputs, "cpp")
    elig = out.eligible
    assert elig.any()
    assert torch.all(out.drop_prob[elig] == torch.tensor(0.5, dtype=torch.float32))
    assert torch.all(out.drop_prob[~elig] == 0)
    assert_matches_reference(inputs, "cpp", dtype)


def test_drop_mask_identical_for_many_seeds():
    case = Case(5, 3, 41, causal=True, padded=True, anchor="eos")
    inputs = make_inputs(case, generator_seed=7)
    seeds = list(range(40)) + [2**31, 2**32 + 7, 2**62 + 12345, -1, -(2**40), -(2**63)]
    for seed in seeds:
        ref = iwtd_reference(*op_args(inputs, seed))
        got = torch.ops.drople_fast.iwtd_cpu(*op_args(inputs, seed))
        assert torch.equal(got[2], ref[2]), f"drop_mask differs for seed {seed}"
        assert torch.equal(got[3], ref[3]) and torch.equal(got[4], ref[4]), f"keep order differs for seed {seed}"


def test_uniform_draws_bit_exact():
    """With p_min = p_max = p every eligible token has drop probability exactly p, so the mask is the raw
    comparison u < p: thresholds at the reference's own draws check the uniforms bit for bit."""
    B, S = 3, 50
    inputs = make_inputs(Case(B, 1, S, seed=0))
    for name in ("q", "k", "hidden"):
        inputs[name] = torch.zeros_like(inputs[name])
    inputs["eligible"] = torch.ones(B, S, dtype=torch.bool)
    for seed in (0, 123456789, -(2**35) + 3):
        u = token_uniform(seed, B, S)
        for p in (0.0, 0.25, float(u[0, 7]), float(u[1, 3]), 0.5, 1.0):
            args = list(op_args(inputs, seed))
            args[9], args[10] = p, p  # p_min = p_max = p: every eligible token has drop probability p
            got = torch.ops.drople_fast.iwtd_cpu(*args)
            content = torch.arange(S)[None, :] != 0
            expected = (u < torch.tensor(p, dtype=torch.float32)) & content
            assert torch.equal(got[2], expected), f"seed {seed} p {p}"


def test_thread_count_does_not_change_results():
    inputs = make_inputs(Case(1, 12, 50, seed=4))  # B < threads: split over heads
    args = op_args(inputs)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.drople_fast.iwtd_cpu(*args)
        torch.set_num_threads(max(2, saved))
        many = torch.ops.drople_fast.iwtd_cpu(*args)
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# fuzzing and statistics
# ---------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    B=st.integers(1, 4), H=st.integers(1, 4), S=st.integers(2, 40), Dh=st.integers(1, 20),
    D=st.integers(1, 24), M=st.integers(1, 7), causal=st.booleans(), padded=st.booleans(),
    anchor=st.sampled_from(["first", "eos"]), dtype=st.sampled_from(DTYPES), seed=st.integers(-(2**63), 2**63 - 1),
    generator_seed=st.integers(0, 2**16),
)
def test_fuzz_random_shapes(B, H, S, Dh, D, M, causal, padded, anchor, dtype, seed, generator_seed):
    case = Case(B, H, S, Dh=Dh, D=D, M=M, causal=causal, padded=padded, anchor=anchor, dtype=dtype, seed=seed)
    assert_matches_reference(make_inputs(case, generator_seed=generator_seed), "cpp", dtype)


def test_drop_frequency_matches_probability():
    """Over N seeds each eligible token is dropped with empirical frequency within 5 sigma of p."""
    inputs = make_inputs(Case(2, 3, 31, padded=True, seed=0), generator_seed=3)
    n = 2000
    counts = torch.zeros(2, 31)
    probs = None
    for seed in range(n):
        out = torch.ops.drople_fast.iwtd_cpu(*op_args(inputs, seed))
        counts += out[2].float()
        if probs is None:
            probs = out[1]
        else:
            assert torch.equal(out[1], probs)  # probabilities do not depend on the seed
    freq = counts / n
    p = probs.double()
    sigma = torch.sqrt(p * (1 - p) / n)
    bound = 5 * sigma + 1.0 / n
    assert torch.all((freq.double() - p).abs() <= bound), (freq - probs).abs().max()
    # tokens that are never eligible are never dropped
    assert torch.all(counts[probs == 0] == 0)
    # and the overall dropped fraction matches the mean probability closely
    elig = probs > 0
    total_sigma = math.sqrt(float((p * (1 - p))[elig].sum()) / n) / float(elig.sum())
    assert abs(float(freq[elig].mean()) - float(p[elig].mean())) <= 5 * total_sigma


# ---------------------------------------------------------------------------
# errors and torch.compile
# ---------------------------------------------------------------------------


def test_operator_rejects_bad_inputs():
    inputs = make_inputs(Case(2, 2, 9))
    args = list(op_args(inputs))
    bad = list(args)
    bad[3] = args[3].to(torch.int32)
    with pytest.raises(RuntimeError, match="eligible must be bool"):
        torch.ops.drople_fast.iwtd_cpu(*bad)
    bad = list(args)
    bad[0] = args[0].transpose(2, 3).contiguous().transpose(2, 3)
    with pytest.raises(RuntimeError, match="q must be contiguous"):
        torch.ops.drople_fast.iwtd_cpu(*bad)
    bad = list(args)
    bad[5] = torch.full((2,), 9, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"outside \[0, 9\)"):
        torch.ops.drople_fast.iwtd_cpu(*bad)
    bad = list(args)
    bad[6] = args[6][:, :-1].contiguous()
    with pytest.raises(RuntimeError, match=r"folded must have shape \(M, D\) = \[6, 24\], got \[6, 23\]"):
        torch.ops.drople_fast.iwtd_cpu(*bad)


def test_torch_compile_fullgraph_matches_eager():
    B, H, S = 3, 4, 17
    inputs = make_inputs(Case(B, H, S, Dh=8, D=24, seed=11))
    # Every token but the CLS anchor is eligible, so exactly one token per sample is always kept.
    inputs["eligible"] = torch.ones(B, S, dtype=torch.bool)
    inputs["eligible"][:, 0] = False

    def step(q, k, hidden, eligible, bridge_tokens, bridge_weight, bridge_bias):
        out = df.iwtd(q, k, hidden, eligible, bridge_tokens, bridge_weight, bridge_bias, anchor_index=0,
                      seed=5, backend="cpp")
        packed = df.compact_fixed(hidden, out, keep=8, num_always=1, seed=5)
        return out.drop_prob, out.drop_mask, out.keep_order, packed.tokens, packed.index, out.bridge_features

    args = [inputs[n] for n in ("q", "k", "hidden", "eligible", "bridge_tokens", "bridge_weight", "bridge_bias")]
    # aot_eager through the operator's fake implementation (inductor is covered in test_compact.py)
    _, got = compile_and_compare(step, args)
    assert got[3].shape == (B, 9, inputs["hidden"].shape[-1])
