"""Bridge logits of every token of the batch as one GEMM: (B*S, D) x (D, M), at fp32-level accuracy.

``logits[r, m] = sum_d hidden[r, d] * folded[m, d] + shift[m]`` (the folded bridge, docs/design.md §3).

Precision by split. The reference multiplies the float32 ``folded`` by the hidden states upcast to
float32. bf16/fp16 hidden states are exact in their own dtype, so ``folded`` alone is split, in
registers, tile by tile: ``folded = p1 + p2 + p3`` with each piece rounded to the hidden dtype and the
residuals exact in fp32. Each tensor-core product ``hidden @ p_i`` multiplies two short mantissas
exactly and accumulates in fp32, so the sum matches an fp32 dot up to summation order: bf16 pieces
carry 3 x 8 bits (fp32's 24; bf16 has fp32's exponent range: the split is exact); fp16 pieces carry
3 x 11 bits, but fp16's range is narrow: the last piece falls into subnormals, so an entry is off by
at most 2**-25 absolute (fp32's own rounding of an entry >= 0.5 is as large); entries >= 65504 would
overflow (a CLIP bridge's T W is O(1)).
No host-side work: the split costs no extra launch. fp32 hidden states take one IEEE FMA dot.
Interpreter: bf16 tiles are upcast to fp32 (its bf16 ``tl.dot`` is wrong); fp16 runs as on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .iwtd_scores import pow2

NUM_PIECES = 3


@triton.jit(do_not_specialize=["R"])
def _bridge_logits_kernel(
    h_ptr, folded_ptr, shift_ptr, out_ptr,
    R, D, M,
    stride_hr, stride_fm, stride_or,
    NPIECE: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KD: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = offs_r < R
    n_ok = offs_n < M
    offs_k = tl.arange(0, BLOCK_KD)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_KD):
        kk = k0 + offs_k
        k_ok = kk < D
        ht = tl.load(h_ptr + offs_r[:, None] * stride_hr + kk[None, :], mask=r_ok[:, None] & k_ok[None, :],
                     other=0.0)
        # folded^T tile (BLOCK_KD, BLOCK_N), float32
        ft = tl.load(folded_ptr + offs_n[None, :] * stride_fm + kk[:, None], mask=k_ok[:, None] & n_ok[None, :],
                     other=0.0)
        if DOT_FP32:
            acc = tl.dot(ht.to(tl.float32), ft, acc, input_precision="ieee")
        else:
            # ft = p1 + p2 + p3, each piece rounded to the hidden dtype (the residuals are exact in fp32)
            rest = ft
            for _p in tl.static_range(NPIECE):
                piece = rest.to(ht.dtype)
                acc = tl.dot(ht, piece, acc)
                rest = rest - piece.to(tl.float32)
    shift = tl.load(shift_ptr + offs_n, mask=n_ok, other=0.0)
    tl.store(out_ptr + offs_r[:, None] * stride_or + offs_n[None, :], acc + shift[None, :],
             mask=r_ok[:, None] & n_ok[None, :])


def split_folded(folded: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The pieces the kernel forms in registers, (NUM_PIECES, M, D) in ``dtype`` (for tests and docs)."""
    rest = folded.to(torch.float32)
    pieces = []
    for _ in range(NUM_PIECES):
        pieces.append(rest.to(dtype))
        rest = rest - pieces[-1].to(torch.float32)
    return torch.stack(pieces)


def config(dtype: str, M: int, D: int, cc: int) -> dict:
    """Tile sizes per architecture (the launcher and the AOT check both call this).

    The fp32 FMA dot keeps a 64 x 64 accumulator and takes D 16 at a time (a 64-wide fp32 K slice was
    what spilled in the one-program kernel). bf16/fp16 split the fp32 folded tile in registers: on sm_90
    D 64 at a time (~130 registers); on sm_80 the mma.sync operand layouts are larger and a 64-wide
    slice spills, so D 32 at a time.
    """
    if dtype == "fp32":
        block_kd = 16
    else:
        block_kd = 64 if (cc >= 90 or cc == 0) else 32
    return dict(BLOCK_R=64, BLOCK_N=min(64, pow2(M)), BLOCK_KD=block_kd,
                NPIECE=1 if dtype == "fp32" else NUM_PIECES, num_warps=4, num_stages=2)


def grid(R: int, M: int, cfg: dict) -> tuple:
    return (triton.cdiv(R, cfg["BLOCK_R"]), triton.cdiv(M, cfg["BLOCK_N"]))
