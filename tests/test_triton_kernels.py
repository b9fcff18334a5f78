"""The three Triton IWTD kernels one by one (the backend matrix is tests/test_backends.py).

Runs on CUDA, or under TRITON_INTERPRET=1 on the CPU (tests/conftest.py sets it). The interpreter's
fp16 ``tl.dot`` is exact (its bf16 one is not, so bf16 tiles are upcast there): the fp16 cases below
run the tensor-core code path that GPUs run. Shapes are small: the interpreter runs each program in
Python.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

from drople_fast.kernels import bridge_logits as bridge  # noqa: E402
from drople_fast.kernels import iwtd_triton  # noqa: E402
from drople_fast.ops.philox import token_uniform  # noqa: E402
from drople_fast.ops.primitives import fold_bridge  # noqa: E402

from iwtd_harness import TOLERANCE, Case, make_inputs, run  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On a GPU, exp/div are approximate instructions and p_max - normed * p_range is one FMA, so a draw u
# within ~1e-7 of p can fall on the other side than on the CPU. Bound how often that may happen.
MAX_MASK_MISMATCH_RATE = 1e-3
MAX_MISMATCH_GAP = 1e-5


def _op_args(inputs, **over):
    folded, shift = fold_bridge(inputs["bridge_tokens"], inputs["bridge_weight"], inputs["bridge_bias"])
    B, S = inputs["hidden"].shape[:2]
    valid = inputs["valid"] if inputs["valid"] is not None else torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    args = dict(q=inputs["q"], k=inputs["k"], hidden=inputs["hidden"], eligible=inputs["eligible"], valid=valid,
                anchor=inputs["anchor_index"].to(torch.int64), folded=folded, shift=shift,
                causal=inputs["causal"], p_min=0.1, p_max=0.5,
                seed=torch.tensor([inputs["seed"]], dtype=torch.int64, device=DEVICE))
    args.update(over)
    return args


def test_fp16_takes_the_tensor_core_path_everywhere():
    assert not iwtd_triton._dot_fp32(torch.float16)
    assert iwtd_triton._dot_fp32(torch.float32)
    assert iwtd_triton._dot_fp32(torch.bfloat16) == (os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.parametrize("causal", [False, True])
def test_fp16_tensor_core_path_matches_reference(causal):
    # Dh 32 and D 64: real tl.dot tiles (>= 16 in every dimension); S 37 spans several query/key blocks.
    case = Case(2, 2, 37, Dh=32, D=64, M=16, P=16, causal=causal, padded=True, anchor="eos" if causal else "first",
                dtype=torch.float16)
    inputs = make_inputs(case, device=DEVICE, generator_seed=11)
    ref = run(inputs, "reference")
    got = run(inputs, "triton")
    torch.testing.assert_close(got.importance.cpu(), ref.importance.cpu(), **TOLERANCE[torch.float16])
    torch.testing.assert_close(got.drop_prob.cpu(), ref.drop_prob.cpu(), **TOLERANCE[torch.float16])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_split_of_the_folded_bridge_is_fp32_exact(dtype):
    # the pieces the bridge kernel forms in registers rebuild the fp32 folded bridge exactly
    # for bf16; within fp16's subnormal floor (2**-25 absolute per entry) for fp16
    g = torch.Generator().manual_seed(0)
    folded = torch.randn(16, 48, generator=g) * torch.logspace(-6, 3, 48)  # entries over nine decades
    pieces = bridge.split_folded(folded, dtype)
    assert pieces.shape == (bridge.NUM_PIECES, 16, 48) and pieces.dtype == dtype
    err = (pieces.double().sum(0) - folded.double()).abs()
    assert err.max() <= (2.0 ** -25 if dtype == torch.float16 else 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_bridge_gemm_matches_float64(dtype):
    g = torch.Generator().manual_seed(1)
    B, S, D, M = 2, 21, 80, 24  # R = 42 rows: a partial row block; M 24: a partial column block
    hidden = torch.randn(B, S, D, generator=g).to(dtype).to(DEVICE)
    folded = (torch.randn(M, D, generator=g) * 0.3).to(DEVICE)
    shift = torch.randn(M, generator=g).to(DEVICE)
    got = _bridge_logits(hidden, folded, shift)
    want = hidden.double().reshape(B * S, D) @ folded.double().t() + shift.double()
    bound = 4 * 2.0 ** -24 * (hidden.double().abs().reshape(B * S, D) @ folded.double().abs().t() + shift.abs().double())
    assert ((got.double() - want).abs() <= bound).all()


def _bridge_logits(hidden, folded, shift):
    B, S, D = hidden.shape
    M = folded.shape[0]
    cfg = bridge.config(iwtd_triton._DTYPE_NAMES[hidden.dtype], M, D, 0)
    rows = hidden.reshape(B * S, D).contiguous()
    out = torch.empty(B * S, M, dtype=torch.float32, device=hidden.device)
    bridge._bridge_logits_kernel[bridge.grid(B * S, M, cfg)](
        rows, folded, shift.float().contiguous(), out, B * S, D, M, rows.stride(0), folded.stride(0), out.stride(0),
        DOT_FP32=iwtd_triton._dot_fp32(hidden.dtype), **cfg)
    return out


def test_two_runs_are_bit_identical():
    inputs = make_inputs(Case(3, 2, 33, Dh=16, D=32, M=8, padded=True, dtype=torch.float16), device=DEVICE)
    first = iwtd_triton.iwtd_triton_op(**_op_args(inputs))
    second = iwtd_triton.iwtd_triton_op(**_op_args(inputs))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_q_k_dtype_mismatch_is_a_clear_error():
    inputs = make_inputs(Case(1, 1, 5), device=DEVICE)
    args = _op_args(inputs, k=inputs["k"].half())
    with pytest.raises(ValueError, match="q and k must have one dtype"):
        iwtd_triton.iwtd_triton_launch(**args)


def test_unsupported_dtype_is_a_clear_error():
    inputs = make_inputs(Case(1, 1, 5), device=DEVICE)
    args = _op_args(inputs, q=inputs["q"].double(), k=inputs["k"].double())
    with pytest.raises(ValueError, match="q must be float32, bfloat16 or float16"):
        iwtd_triton.iwtd_triton_launch(**args)


def test_out_of_range_anchor_reads_nothing_out_of_bounds():
    # torch.compile skips the host-side value checks, so the kernel guards the anchor load itself:
    # an anchor outside [0, S) gives an all-zero s1 instead of an illegal address.
    inputs = make_inputs(Case(2, 1, 9), device=DEVICE)
    out = iwtd_triton.iwtd_triton_launch(**_op_args(inputs, anchor=torch.tensor([9, -3], device=DEVICE)))
    assert all(torch.isfinite(t.float()).all() for t in out[:2])


def test_empty_batch():
    inputs = make_inputs(Case(1, 1, 5), device=DEVICE)
    args = _op_args(inputs)
    for name in ("q", "k", "hidden", "eligible", "valid", "anchor"):
        args[name] = args[name][:0]
    imp, prob, mask, count, order = iwtd_triton.iwtd_triton_launch(**args)
    assert imp.shape == (0, 5) and count.shape == (0,)


def test_mask_mismatch_rate_is_bounded():
    # Many draws at realistic peaky scores: masks may differ from the reference only for draws within
    # MAX_MISMATCH_GAP of p, and only rarely (0 under the interpreter, whose exp is exact to fp32).
    case = Case(4, 2, 48, Dh=16, D=32, M=8, dtype=torch.float16)
    total = differ = 0
    for seed in range(2):
        inputs = make_inputs(case, device=DEVICE, generator_seed=seed)
        inputs["seed"] = seed
        ref = run(inputs, "reference")
        got = run(inputs, "triton")
        mismatch = got.drop_mask.cpu() != ref.drop_mask.cpu()
        if mismatch.any():
            u = token_uniform(seed, case.B, case.S)
            assert (u - ref.drop_prob.cpu()).abs()[mismatch].max() < MAX_MISMATCH_GAP
        differ += int(mismatch.sum())
        total += mismatch.numel()
    assert differ / total <= MAX_MASK_MISMATCH_RATE

