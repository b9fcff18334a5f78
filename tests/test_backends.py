"""The backend test matrix: every fused IWTD backend against the reference and against each other.

backend (cpp; triton on CUDA or through the Triton interpreter, which tests/conftest.py selects on
machines without CUDA) x dtype (float32, bfloat16, float16) x variant (vision; causal text with
padding and per-sample EOS anchors; a sample with no eligible token; S = 2) x odd shapes. Each case
checks scores against the reference run on the same (rounded) inputs and the drop decisions exactly
(tests/iwtd_harness.py). Then: decisions agree across backends, equal scores give p_max, many seeds,
torch.library.opcheck for every custom op, and torch.compile against eager.

Backends that cannot run here are skipped with their reason. The interpreter is slow, so the Triton
shapes are small; the C++ operator also runs the larger odd shapes.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import drople_fast as df
from drople_fast.ops import backends, library
from drople_fast.ops.backends import BACKENDS
from drople_fast.ops.philox import token_uniform

from iwtd_harness import (Case, assert_matches_reference, assert_same_decisions, compile_and_compare, make_inputs,
                          op_args, run)

FUSED = ("cpp", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
VARIANTS = ("vision", "text", "ineligible", "S2")
# (B, H, S): odd S, H in {1, 2, 3, 12}, B in {1, 3, 5}; vision/ineligible/text/S2 cover full and causal
# attention, dense and padded batches, CLS and per-sample EOS anchors
SHAPES = [(1, 1, 7), (3, 2, 23)]
CPP_ONLY_SHAPES = [(1, 1, 201), (5, 3, 7), (1, 12, 50), (5, 3, 197), (5, 12, 7)]  # Triton: test_triton_backend.py


def device_for(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def require(backend: str, dtype: torch.dtype = torch.float32) -> str:
    """The device ``backend`` runs on here; skips the test with the backend's reason if it cannot."""
    device = device_for(backend)
    reason = BACKENDS[backend].why_not(torch.device(device), dtype)
    if reason is not None:
        pytest.skip(f"{backend} backend unusable: {reason}")
    return device


def variant_case(variant: str, shape, dtype) -> Case:
    B, H, S = shape
    if variant == "text":
        return Case(B, H, S, causal=True, padded=True, anchor="eos", dtype=dtype, seed=S + 17)
    if variant == "S2":  # a text sequence of just SOT and EOS
        return Case(B, H, 2, causal=True, anchor="eos", dtype=dtype, seed=19)
    if variant == "ineligible":  # padded vision batch, one sample without eligible tokens
        return Case(B, H, S, padded=True, dtype=dtype, seed=S + 17)
    return Case(B, H, S, dtype=dtype, seed=S + 17)


def variant_inputs(variant: str, shape, dtype, device) -> dict:
    case = variant_case(variant, shape, dtype)
    inputs = make_inputs(case, device=device, generator_seed=case.B * 1000 + case.S)
    if variant == "ineligible":
        inputs["eligible"] = inputs["eligible"].clone()
        inputs["eligible"][case.B // 2] = False
    return inputs


def _matrix():
    params = []
    for backend in FUSED:
        shapes = SHAPES + (CPP_ONLY_SHAPES if backend == "cpp" else [])
        for dtype in DTYPES:
            for variant in VARIANTS:
                seen = set()
                for shape in shapes:
                    key = shape[:2] if variant == "S2" else shape  # S2 fixes S
                    if key in seen:
                        continue
                    seen.add(key)
                    S = 2 if variant == "S2" else shape[2]
                    name = f"{backend}-{str(dtype).removeprefix('torch.')}-{variant}-B{shape[0]}H{shape[1]}S{S}"
                    params.append(pytest.param(backend, dtype, variant, shape, id=name))
    return params


@pytest.mark.parametrize("backend,dtype,variant,shape", _matrix())
def test_matches_reference(backend, dtype, variant, shape):
    device = require(backend, dtype)
    inputs = variant_inputs(variant, shape, dtype, device)
    got, _ = assert_matches_reference(inputs, backend, dtype)
    if variant == "ineligible":
        b = shape[0] // 2
        n_valid = int(got.valid[b].sum())
        assert not got.drop_mask[b].any() and torch.all(got.drop_prob[b] == 0)
        assert int(got.keep_count[b]) == n_valid
        assert torch.equal(got.keep_order[b, :n_valid].cpu(), torch.nonzero(got.valid[b].cpu()).flatten())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_decisions_agree_across_backends(variant, dtype):
    """Every usable fused backend takes the same drop decisions on the same inputs."""
    usable = [b for b in FUSED if BACKENDS[b].why_not(torch.device(device_for(b)), dtype) is None]
    if len(usable) < 2:
        pytest.skip(f"fewer than two fused backends usable here: {usable}")
    outs = {b: run(variant_inputs(variant, (3, 2, 23), dtype, device_for(b)), b) for b in usable}
    first, *others = usable
    for other in others:
        torch.testing.assert_close(outs[other].drop_prob.cpu(), outs[first].drop_prob.cpu(), rtol=1e-4, atol=1e-5)
        seed = variant_case(variant, (3, 2, 23), dtype).seed
        assert_same_decisions(outs[other], outs[first], seed, dtype, what=f"{other} vs {first}: ")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FUSED)
def test_equal_scores_give_p_max(backend, dtype):
    """Zero q, k and hidden make every score constant on C: the zero range counts as one, p = p_max on E."""
    device = require(backend, dtype)
    case = Case(3, 2, 13, padded=True, dtype=dtype, seed=9)
    inputs = make_inputs(case, device=device)
    for name in ("q", "k", "hidden"):
        inputs[name] = torch.zeros_like(inputs[name])
    p_max = 0.45
    got, _ = assert_matches_reference(inputs, backend, dtype, p_max=p_max)
    content = got.valid.clone()
    content[:, 0] = False
    expected = torch.where(inputs["eligible"] & content, torch.tensor(p_max, dtype=torch.float32, device=device), 0.0)
    assert torch.equal(got.drop_prob, expected)
    for b in range(case.B):
        c = got.importance[b][content[b]]
        assert torch.equal(c, c.roll(1)), "importance should be constant over C"


@pytest.mark.parametrize("backend", FUSED)
def test_causal_equal_inputs_match_reference(backend):
    # Under the causal mask row j sees j + 1 keys, so zero inputs do not give constant scores.
    device = require(backend)
    inputs = make_inputs(Case(3, 2, 11, causal=True, anchor="eos", seed=9), device=device)
    for name in ("q", "k", "hidden"):
        inputs[name] = torch.zeros_like(inputs[name])
    assert_matches_reference(inputs, backend)


SEEDS = [0, 12345, 2**33 + 7, 2**62 + 99, -5, -(2**63)]


@pytest.mark.parametrize("backend", FUSED)
def test_drop_mask_equals_reference_for_many_seeds(backend):
    device = require(backend)
    inputs = make_inputs(Case(4, 2, 29, causal=True, padded=True, anchor="eos"), device=device, generator_seed=7)
    for seed in SEEDS:
        ref = run(inputs, "reference", seed=seed)
        got = run(inputs, backend, seed=seed)
        assert torch.equal(got.drop_mask.cpu(), ref.drop_mask.cpu()), f"drop_mask differs for seed {seed}"
        assert torch.equal(got.keep_count.cpu(), ref.keep_count.cpu()), f"keep_count differs for seed {seed}"
        assert torch.equal(got.keep_order.cpu(), ref.keep_order.cpu()), f"keep_order differs for seed {seed}"


@pytest.mark.parametrize("backend", FUSED)
def test_uniform_stream_is_the_reference_stream(backend):
    """With p_min = p_max = p the mask is the raw comparison u < p on eligible content tokens: thresholds at
    the reference's own draws check the uniforms bit for bit."""
    device = require(backend)
    B, S = 3, 17
    inputs = make_inputs(Case(B, 1, S), device=device)
    for seed in (3, -(2**35) + 3):
        u = token_uniform(seed, B, S)
        for p in (0.0, float(u[0, 7]), float(u[1, 3]), 1.0):
            got = run(inputs, backend, seed=seed, p_min=p, p_max=p)
            content = torch.ones(B, S, dtype=torch.bool)
            content[:, 0] = False
            expected = inputs["eligible"].cpu() & content & (u < torch.tensor(p, dtype=torch.float32))
            assert torch.equal(got.drop_mask.cpu(), expected), f"seed {seed} p {p}"


# ---------------------------------------------------------------------------
# torch.library.opcheck for every custom op
# ---------------------------------------------------------------------------


def _fused_op(backend: str):
    if backend == "cpp":
        library.load_cpp_extension()
        return torch.ops.drople_fast.iwtd_cpu.default
    from drople_fast.kernels.iwtd_triton import iwtd_triton_op

    return iwtd_triton_op


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck_fused_op(backend):
    device = require(backend)
    inputs = make_inputs(Case(2, 2, 9, padded=True, anchor="eos", causal=True, seed=7), device=device)
    torch.library.opcheck(_fused_op(backend), op_args(inputs))


def test_opcheck_token_uniform():
    from drople_fast.ops.philox import _token_uniform_op

    torch.library.opcheck(_token_uniform_op, (torch.tensor([77], dtype=torch.int64), 3, 5))
    torch.library.opcheck(_token_uniform_op, (torch.tensor([-9], dtype=torch.int64), 2, 4, 7))


def test_opcheck_gather_scatter():
    x = torch.randn(2, 6, 3, requires_grad=True)
    idx = torch.tensor([[0, 2, 5, -1], [1, 3, 4, 5]])
    torch.library.opcheck(torch.ops.drople_fast.gather_tokens.default, (x, idx))
    torch.library.opcheck(torch.ops.drople_fast.scatter_tokens.default,
                          (torch.randn(2, 4, 3, requires_grad=True), idx, 6))


# ---------------------------------------------------------------------------
# availability: decided once, outside any trace
# ---------------------------------------------------------------------------


def test_availability_does_not_look_for_modules_per_call(monkeypatch):
    # torch 2.11's dynamo refuses to trace importlib.util.find_spec: a per-call lookup breaks fullgraph traces
    def refuse(*args, **kwargs):
        raise AssertionError("find_spec called while choosing a backend")

    monkeypatch.setattr(importlib.util, "find_spec", refuse)
    for backend in BACKENDS.values():
        backend.why_not(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("triton_v,numpy_v,broken", [((3, 6), (2, 4), True), ((3, 6), (2, 3), False),
                                                     ((3, 7), (2, 4), False), ((3, 8), (3, 0), False)])
def test_interpreter_numpy_incompatibility_is_named(monkeypatch, triton_v, numpy_v, broken):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(backends, "_version", {"triton": triton_v, "numpy": numpy_v}.get)
    missing, interpreter = backends._triton_install_problem()
    assert missing is None
    if broken:
        assert "numpy<2.4" in interpreter and f"{numpy_v[0]}.{numpy_v[1]}" in interpreter
        monkeypatch.setattr(backends, "_TRITON_INTERPRETER_BROKEN", interpreter)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert BACKENDS["triton"].why_not(torch.device("cpu"), torch.float32) == interpreter
    else:
        assert interpreter is None


def test_this_environment_can_run_the_triton_interpreter():
    # The suite tests every Triton kernel through the interpreter: an environment that cannot run it
    # (triton < 3.7 with numpy >= 2.4) must fail here, not turn those tests into skips.
    if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter is not in use here")
    assert backends._TRITON_INTERPRETER_BROKEN is None, backends._TRITON_INTERPRETER_BROKEN


# ---------------------------------------------------------------------------
# torch.compile against eager
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED)
def test_compile_fullgraph_matches_eager(backend):
    """iwtd + compact_fixed + bridge features in one graph (aot_eager on the CPU: the ops' fake and autograd
    registrations decide graph breaks; inductor on CUDA)."""
    device = require(backend)
    B, H, S = 3, 2, 17
    inputs = make_inputs(Case(B, H, S, eligible="content", seed=11), device=device)

    def step(q, k, hidden, eligible, bridge_tokens, bridge_weight, bridge_bias):
        out = df.iwtd(q, k, hidden, eligible, bridge_tokens, bridge_weight, bridge_bias, anchor_index=0,
                      seed=5, backend=backend)
        packed = df.compact_fixed(hidden, out, keep=8, num_always=1, seed=5)
        return out.drop_prob, out.drop_mask, out.keep_order, packed.tokens, packed.index, out.bridge_features

    args = [inputs[n] for n in ("q", "k", "hidden", "eligible", "bridge_tokens", "bridge_weight", "bridge_bias")]
    _, got = compile_and_compare(step, args, backend="inductor" if device == "cuda" else "aot_eager")
    assert got[3].shape == (B, 9, inputs["hidden"].shape[-1])
