"""What only the fused C++ CPU backend (``torch.ops.drople_fast.iwtd_cpu``) needs beyond the backend matrix
(tests/test_backends.py): realistic layer sizes, thread-count independence, fuzzing, drop statistics and
the operator's own argument checks.

Skipped as a whole when ``drople_fast._C`` is not built
(``pip install --no-build-isolation -e .`` builds it).
"""
from __future__ import annotations

import math

import pytest
import torch

from drople_fast.ops import library as ops

from iwtd_harness import Case, assert_matches_reference, make_inputs, op_args

_MISSING = ops.cpp_extension_error()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"C++ extension not available: {_MISSING}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------
# agreement with the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_realistic_vision_and_text_layers(dtype):
    vision = Case(2, 12, 197, Dh=64, D=768, M=64, P=512, dtype=dtype, seed=5)
    assert_matches_reference(make_inputs(vision), "cpp", dtype)
    text = Case(3, 8, 77, Dh=64, D=512, M=64, P=512, causal=True, padded=True, anchor="eos", dtype=dtype, seed=6)
    assert_matches_reference(make_inputs(text), "cpp", dtype)


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


