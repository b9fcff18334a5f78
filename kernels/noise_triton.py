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

from ..ops.noise import register

BLOCK_D = 256


def config(D: int) -> dict:
    """Launch configuration for rows of width ``D`` (the launcher and the AOT check both use it). Warps and
    stages are Triton's defaults, spelled out so the AOT check compiles what launches."""
    return dict(BLOCK=min(BLOCK_D, triton.next_power_of_2(D)), num_warps=4, num_stages=3)


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
    cfg = config(D)
    grid = (B * S, triton.cdiv(D, cfg["BLOCK"]))
    _perturb_noise_kernel[grid](hidden, out, sel, key, float(sigma), S, D, row_stride if row_stride > 0 else S,
                                **cfg)
    return out


def aot_configs(point, cc: int) -> list:
    """The launch configuration of :func:`perturb_noise_triton` for a matrix point (see ops/aot.py): it
    depends on the hidden dtype and width D only (plus which of S, D Triton specialises as multiples of 16;
    row_stride is S for a launch without one)."""
    from .registry import KernelConfig, divisible_ints, signature_for

    cfg = config(point.D)
    consts = {"BLOCK": cfg["BLOCK"]}
    fn = _perturb_noise_kernel
    sig = signature_for(fn, dict(h_ptr=point.dtype, out_ptr=point.dtype, sel_ptr="u8", seed_ptr="i64"), consts,
                        floats=("sigma",))
    ints = dict(S=point.S, D=point.D, row_stride=point.S)
    return [KernelConfig("perturb_noise", fn, sig, tuple(consts.items()), cfg["num_warps"], cfg["num_stages"],
                         divisible_ints(fn, ints))]


register(perturb_noise_triton)
