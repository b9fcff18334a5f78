"""IWTD on the GPU in three deterministic Triton launches (the ``drople_fast::iwtd_triton`` op).

``iwtd_triton_op`` has the fused signature of :mod:`drople_fast.ops.backends`; its semantics are
exactly :func:`drople_fast.ops.reference.iwtd_reference` (float32 math whatever the input dtype),
without forming the (B, H, S, S) attention map. The work is split so that it fills the machine
(docs/gpu-cost-model.md compares this design with the former one-program-per-sample kernel and with
scores emitted by the attention kernel itself):

1. :mod:`.iwtd_scores` -- s1/s2 per head over a (query block, head, sample) grid, per-head partials;
2. :mod:`.bridge_logits` -- the bridge logits of all B*S tokens as one tensor-core GEMM with a
   three-piece split of the folded bridge (fp32-level accuracy);
3. :mod:`.iwtd_epilogue` -- per sample: head means, bridge softmax over tokens, normalisation,
   min-max, p, Philox draws, counts and prefix-sum keep order.

No atomics: every reduction has a fixed order, so two runs give the same bits. Sizes that change every
layer in "drop" mode (S, and the strides and row counts derived from it) are not specialised on, so a
new S does not recompile. Launch configurations come from each module's ``config`` function, which the
ahead-of-time checker (``python -m drople_fast.ops.aot``) compiles for sm_80 and sm_90.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ..ops.library import fused_fake
from . import bridge_logits as _bridge
from . import iwtd_epilogue as _epi
from . import iwtd_scores as _scores

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_MAX_GRID_YZ = 65535  # CUDA limit of grid axes 1 and 2 (heads, samples of the scores kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _dot_fp32(dtype: torch.dtype) -> bool:
    """fp32 inputs take the IEEE FMA dot; bf16 too under the interpreter, whose bf16 tl.dot is wrong."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreting())


def _check(q, k, hidden, folded) -> None:
    for name, t in (("q", q), ("hidden", hidden)):
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"triton IWTD: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if k.dtype != q.dtype:
        raise ValueError(f"triton IWTD: q and k must have one dtype, got q={q.dtype} k={k.dtype}")
    devices = {t.device for t in (q, k, hidden, folded)}
    if len(devices) > 1:
        raise ValueError(f"triton IWTD: all tensors must be on one device, got {sorted(map(str, devices))}")
    B, H = q.shape[0], q.shape[1]
    if B > _MAX_GRID_YZ or H > _MAX_GRID_YZ:
        raise ValueError(f"triton IWTD: batch and heads must be <= {_MAX_GRID_YZ}, got B={B} H={H}")


def iwtd_triton_launch(q, k, hidden, eligible, valid, anchor, folded, shift, causal, p_min, p_max, seed,
                       row_stride=0):
    """Allocate outputs and run the three kernels; returns the fused backends' five outputs."""
    _check(q, k, hidden, folded)
    B, H, S, Dh = q.shape
    D = hidden.shape[2]
    M = folded.shape[0]
    device = q.device
    importance = torch.empty(B, S, dtype=torch.float32, device=device)
    drop_prob = torch.empty(B, S, dtype=torch.float32, device=device)
    drop_mask = torch.empty(B, S, dtype=torch.bool, device=device)
    keep_count = torch.empty(B, dtype=torch.int64, device=device)
    keep_order = torch.empty(B, S, dtype=torch.int64, device=device)
    if B == 0 or S == 0:
        keep_count.zero_()
        return importance, drop_prob, drop_mask, keep_count, keep_order

    # Launch on the tensors' GPU, not the current one (a tensor on cuda:1 would be an illegal address).
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        q = q.contiguous()
        k = k.contiguous()
        hidden = hidden.contiguous()
        eligible_u8 = eligible.contiguous().view(torch.uint8)
        valid_u8 = valid.contiguous().view(torch.uint8)
        anchor = anchor.to(torch.int64).contiguous()
        seed = seed.to(torch.int64).reshape(1).contiguous()
        shift = shift.to(torch.float32).contiguous()

        # 1. per-head s1/s2 partials
        sc = _scores.config(_DTYPE_NAMES[q.dtype], S, Dh, _cc(device))
        part = torch.empty(B, 2, H, S, dtype=torch.float32, device=device)
        _scores._scores_kernel[_scores.grid(B, H, S, sc["BLOCK_Q"])](
            q, k, valid_u8, anchor, part, S, H, Dh,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            1.0 / (Dh ** 0.5),
            CAUSAL=bool(causal), DOT_FP32=_dot_fp32(q.dtype), **sc)

        # 2. bridge logits of all tokens
        bc = _bridge.config(_DTYPE_NAMES[hidden.dtype], M, D, _cc(device))
        folded = folded.to(torch.float32).contiguous()
        rows = hidden.view(B * S, D)
        logits = torch.empty(B * S, M, dtype=torch.float32, device=device)
        _bridge._bridge_logits_kernel[_bridge.grid(B * S, M, bc)](
            rows, folded, shift, logits, B * S, D, M, rows.stride(0), folded.stride(0), logits.stride(0),
            DOT_FP32=_dot_fp32(hidden.dtype), **bc)

        # 3. per-sample epilogue
        ec = _epi.config(S, M, _cc(device))
        scratch = torch.empty(B, 3, S, dtype=torch.float32, device=device)
        p_range = float(p_max) - float(p_min)  # double, rounded once to fp32, as in the reference
        _epi._epilogue_kernel[(B,)](
            part, logits, valid_u8, eligible_u8, anchor, seed, scratch,
            importance, drop_prob, drop_mask.view(torch.uint8), keep_count, keep_order,
            S, H, M, row_stride if row_stride > 0 else S, logits.stride(0),
            float(p_max), p_range, 1.0 / H, **ec)
    return importance, drop_prob, drop_mask, keep_count, keep_order


def _cc(device: torch.device) -> int:
    """Compute capability as 80, 90, ... (the configs may differ per architecture); 0 off-GPU."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def aot_configs(point, cc: int) -> list:
    """The launch configurations of :func:`iwtd_triton_launch` for a matrix point (see ops/aot.py)."""
    from .registry import KernelConfig, divisible_ints, signature_for

    def make(name, fn, ptrs, consts, cfg, ints, floats=()):
        consts = {**consts, **{k: v for k, v in cfg.items() if k.isupper()}}
        sig = signature_for(fn, ptrs, consts, floats=floats)
        return KernelConfig(name, fn, sig, tuple(consts.items()), cfg["num_warps"], cfg["num_stages"],
                            divisible_ints(fn, ints))

    dt = point.dtype
    S, H, Dh, M, D = point.S, point.H, point.Dh, point.M, point.D
    # the int arguments the launcher passes for this point (B does not change a compiled kernel)
    scores_ints = dict(S=S, H=H, DH=Dh, stride_qb=H * S * Dh, stride_qh=S * Dh, stride_qs=Dh,
                       stride_kb=H * S * Dh, stride_kh=S * Dh, stride_ks=Dh)
    bridge_ints = dict(R=S, D=D, M=M, stride_hr=D, stride_fm=D, stride_or=M)
    epi_ints = dict(S=S, H=H, M=M, row_stride=S, stride_lr=M)
    sc = _scores.config(dt, point.S, point.Dh, cc)
    bc = _bridge.config(dt, point.M, point.D, cc)
    ec = _epi.config(point.S, point.M, cc)
    return [
        make("iwtd_scores", _scores._scores_kernel,
             dict(q_ptr=dt, k_ptr=dt, valid_ptr="u8", anchor_ptr="i64", part_ptr="fp32"),
             dict(CAUSAL=point.causal, DOT_FP32=dt == "fp32"), sc, scores_ints, floats=("sm_scale",)),
        make("bridge_logits", _bridge._bridge_logits_kernel,
             dict(h_ptr=dt, folded_ptr="fp32", shift_ptr="fp32", out_ptr="fp32"),
             dict(DOT_FP32=dt == "fp32"), bc, bridge_ints),
        make("iwtd_epilogue", _epi._epilogue_kernel,
             dict(part_ptr="fp32", logits_ptr="fp32", valid_ptr="u8", elig_ptr="u8", anchor_ptr="i64",
                  seed_ptr="i64", scratch_ptr="fp32", imp_ptr="fp32", prob_ptr="fp32", mask_ptr="u8",
                  count_ptr="i64", order_ptr="i64"),
             {}, ec, epi_ints, floats=("p_max", "p_range", "inv_h")),
    ]


@torch.library.custom_op("drople_fast::iwtd_triton", mutates_args=())
def iwtd_triton_op(
    q: torch.Tensor, k: torch.Tensor, hidden: torch.Tensor, eligible: torch.Tensor, valid: torch.Tensor,
    anchor: torch.Tensor, folded: torch.Tensor, shift: torch.Tensor, causal: bool, p_min: float,
    p_max: float, seed: torch.Tensor, row_stride: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """IWTD (backends.py signature): (importance, drop_prob, drop_mask, keep_count, keep_order)."""
    return iwtd_triton_launch(q, k, hidden, eligible, valid, anchor, folded, shift, causal, p_min, p_max, seed,
                              row_stride)


iwtd_triton_op.register_fake(fused_fake)
