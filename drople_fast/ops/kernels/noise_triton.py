"""Perturb mode's per-element noise in one Triton launch: ``drople_fast::perturb_noise_triton``.

Semantics: :mod:`drople_fast.ops.noise` (the reference is its specification). Grid
(B * S, cdiv(D, BLOCK_D)): each program reads one block of one row, and if the row is
selected draws ``tl.randn(key, (b * row_stride + j) * D + d)`` and writes
``h * (1 + sigma * n)`` (float32 math), else copies the block. One read and one write
of ``hidden``; the key is read from device memory, so the launch needs no host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..noise import register

BLOCK_D = 256


@triton.jit
def _perturb_noise_kernel(h_ptr, out_ptr, sel_ptr, seed_ptr, sigma, S, D, row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < D
    h = tl.load(h_ptr + row * D + offs, mask=inside, other=0.0)
    selected = tl.load(sel_ptr + row) != 0
    if selected:
        b = row // S
        j = row % S
        counter = (b * row_stride + j) * D + offs.to(tl.int64)
        noise = tl.randn(tl.load(seed_ptr), counter)
        out = (h.to(tl.float32) * (1.0 + sigma * noise)).to(h.dtype)
    else:
        out = h
    tl.store(out_ptr + row * D + offs, out, mask=inside)


@torch.library.custom_op("drople_fast::perturb_noise_triton", mutates_args=())
def perturb_noise_triton(hidden: torch.Tensor, selected: torch.Tensor, seed: torch.Tensor, sigma: float,
                         row_stride: int = 0) -> torch.Tensor:
    """``hidden`` with selected rows scaled by ``1 + sigma * n`` per element (see drople_fast.ops.noise)."""
    B, S, D = hidden.shape
    out = torch.empty_like(hidden)
    if hidden.numel() == 0:
        return out
    hidden = hidden.contiguous()
    sel = selected.contiguous().view(torch.uint8)
    key = seed.to(torch.int64).reshape(1).contiguous()
    block = min(BLOCK_D, triton.next_power_of_2(D))
    grid = (B * S, triton.cdiv(D, block))
    _perturb_noise_kernel[grid](hidden, out, sel, key, float(sigma), S, D, row_stride if row_stride > 0 else S,
                                BLOCK=block)
    return out


register(perturb_noise_triton)
