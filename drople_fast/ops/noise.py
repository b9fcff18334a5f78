"""Perturb mode's multiplicative noise, per element, as one fused op per backend.

The release scales every selected token by ``randn_like(hidden) * sigma + 1``: one
normal draw per element (B, S, D) (release/utils/token_importance.py:173-174,
sigma 0.03). Here the draw is counter-based so that every backend and device
gives the same noise for a key:

* element (b, j, d) uses Philox4x32-10 with the noise key and the 64-bit counter
  ``(b * row_stride + j) * D + d`` (row_stride 0 means S; the text tower passes its
  untrimmed width, as for the drop mask);
* the normal is exactly what Triton's ``tl.randn(key, counter)`` computes: Box-Muller
  ``sqrt(-2 log max(u1, 1e-7)) * cos(2 pi u2)`` (float32) on the uniforms of the
  first two output words ``c0, c1`` of that one Philox call;
* ``out = hidden * (1 + sigma * n)`` (float32 math, rounded once to hidden's dtype)
  on selected rows; every other row is copied unchanged.

The Philox words (hence u1, u2) are bit-identical across backends; ``log``/``cos``/
``sqrt`` are each backend's float32 library functions (torch/SLEEF, glibc, CUDA
libdevice or numpy in the interpreter), which agree to a few ulp: the normals
agree to :data:`NORMAL_ATOL` absolute, the factors ``1 + sigma n`` to
``sigma * NORMAL_ATOL`` (about 1e-7 at sigma = 0.03: below float32 resolution of the factor).

Each backend is a ``torch.library`` custom op (``perturb_noise_reference``,
``perturb_noise_cpu`` in C++, ``perturb_noise_triton``) with a fake and a registered
autograd formula: the output is linear in ``hidden`` with the factor depending only
on (key, selected rows), so the gradient is the same op applied to the incoming
gradient (recomputing the noise instead of saving it: nothing of size (B, S, D) is
kept for backward). No op materialises a (B, S, D) noise tensor beyond its output.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .philox import philox4x32_words, stream, uniform_from_uint32

# Absolute agreement of the standard normals across backends (a few float32 ulp of
# log/cos/sqrt, times |r| <= sqrt(-2 ln 1e-7) ~ 5.7).
NORMAL_ATOL = 4e-6
# float32(2 pi) and the Box-Muller floor, as tl.randn rounds them.
TWO_PI = 6.283185307179586
U1_FLOOR = 1.0e-7


def noise_key(layer_key: Union[int, torch.Tensor]) -> Union[int, torch.Tensor]:
    """The Philox key of a layer's per-element perturbation noise: its mask key with purpose "noise"
    (the stream layout is documented in one place, :mod:`drople_fast.clip.seeds`)."""
    return stream(layer_key, "noise")


def element_offsets(rows: torch.Tensor, seq: int, width: int, row_stride: int = 0) -> torch.Tensor:
    """(R, D) Philox counters of the flat rows ``rows`` (= b * S + j) of a (B, S, D) tensor."""
    stride = row_stride if row_stride > 0 else seq
    b, j = rows // seq, rows % seq
    base = (b * stride + j) * width
    return base[:, None] + torch.arange(width, device=rows.device, dtype=torch.int64)[None, :]


def box_muller(c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """Triton's ``pair_uniform_to_normal`` (first output) on two uint32 words, float32."""
    u1 = uniform_from_uint32(c0).clamp(min=U1_FLOOR)
    u2 = uniform_from_uint32(c1)
    theta = torch.tensor(TWO_PI, dtype=torch.float32, device=u2.device) * u2
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)


def element_normal(key: Union[int, torch.Tensor], offsets: torch.Tensor) -> torch.Tensor:
    """Standard normals (float32) at Philox ``offsets`` for ``key``: exactly ``tl.randn(key, offsets)``."""
    c0, c1, _, _ = philox4x32_words(key, offsets)
    return box_muller(c0, c1)


def _check(hidden: torch.Tensor, selected: torch.Tensor, seed: torch.Tensor, sigma: float, row_stride: int):
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, S, D), got shape {tuple(hidden.shape)}")
    if selected.dtype != torch.bool or tuple(selected.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"selected must be bool (B, S) = {tuple(hidden.shape[:2])}, got {selected.dtype} "
                         f"{tuple(selected.shape)}")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"seed must be a one-element int64 tensor, got {seed.dtype} {tuple(seed.shape)}")
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    S = hidden.shape[1]
    if row_stride != 0 and row_stride < S:
        raise ValueError(f"row_stride must be 0 (meaning S) or >= S={S}, got {row_stride}")


# --------------------------------------------------------------------------
# reference backend (plain PyTorch): the specification
# --------------------------------------------------------------------------


@torch.library.custom_op("drople_fast::perturb_noise_reference", mutates_args=())
def perturb_noise_reference(hidden: torch.Tensor, selected: torch.Tensor, seed: torch.Tensor, sigma: float,
                            row_stride: int = 0) -> torch.Tensor:
    """``hidden`` with selected rows scaled by ``1 + sigma * n`` per element (module docstring)."""
    B, S, D = hidden.shape
    out = hidden.clone()
    rows = selected.reshape(-1).nonzero().squeeze(1)  # a host sync: the reference is the oracle, not the hot path
    if rows.numel() == 0:
        return out
    noise = element_normal(seed.reshape(()), element_offsets(rows, S, D, row_stride))
    factor = 1.0 + torch.tensor(sigma, dtype=torch.float32, device=hidden.device) * noise
    flat = out.view(B * S, D)
    flat.index_copy_(0, rows, (flat.index_select(0, rows).float() * factor).to(hidden.dtype))
    return out


# --------------------------------------------------------------------------
# fakes and autograd, shared by every backend op
# --------------------------------------------------------------------------


def _fake(hidden, selected, seed, sigma, row_stride=0):
    return torch.empty_like(hidden)


def _setup(ctx, inputs, output):
    _, selected, seed, sigma, row_stride = inputs
    ctx.save_for_backward(selected, seed)
    ctx.sigma, ctx.row_stride = sigma, row_stride


def _backward_with(op):
    def backward(ctx, grad):
        selected, seed = ctx.saved_tensors
        # d out / d hidden is the same per-element factor: apply the op to the gradient.
        return op(grad.contiguous(), selected, seed, ctx.sigma, ctx.row_stride), None, None, None, None

    return backward


def register(op, name: Optional[str] = None) -> None:
    """Give a backend op (Python custom op, or the name of a C++ one) its fake and autograd."""
    target = name if name is not None else op
    torch.library.register_fake(target)(_fake)
    torch.library.register_autograd(target, _backward_with(op), setup_context=_setup)


register(perturb_noise_reference)


# --------------------------------------------------------------------------
# backend choice and the public function
# --------------------------------------------------------------------------

_CPP_REGISTERED = False


def _cpp_op():
    global _CPP_REGISTERED
    from . import library

    library.load_cpp_extension()
    if not _CPP_REGISTERED:
        register(torch.ops.drople_fast.perturb_noise_cpu.default, "drople_fast::perturb_noise_cpu")
        _CPP_REGISTERED = True
    return torch.ops.drople_fast.perturb_noise_cpu.default


def _triton_op():
    from ..kernels import noise_triton

    return noise_triton.perturb_noise_triton


_LOADERS = {"reference": lambda: perturb_noise_reference, "cpp": _cpp_op, "triton": _triton_op}


def noise_op(backend: Optional[str], device: torch.device, dtype: torch.dtype):
    """The noise op of ``backend`` (None: the best usable one, as for IWTD); ValueError with the reason."""
    from .backends import BACKENDS, _PREFERENCE

    if backend is None:
        for candidate in _PREFERENCE.get(device.type, ("reference",)):
            if BACKENDS[candidate].why_not(device, dtype) is None:
                return _LOADERS[candidate]()
        return perturb_noise_reference
    if backend not in _LOADERS:
        raise ValueError(f"backend must be one of {sorted(_LOADERS)} or None, got {backend!r}")
    reason = BACKENDS[backend].why_not(device, dtype)
    if reason:
        raise ValueError(f"noise backend {backend!r} cannot run here: {reason}")
    return _LOADERS[backend]()


def perturb(hidden: torch.Tensor, selected: torch.Tensor, seed: Union[int, torch.Tensor], sigma: float,
            row_stride: int = 0, backend: Optional[str] = None) -> torch.Tensor:
    """Scale the ``selected`` (B, S) rows of ``hidden`` (B, S, D) by ``1 + sigma * n``, n ~ N(0, 1) per element.

    ``seed`` is the noise stream's key (:func:`noise_key` of the layer key); identical on
    every backend for a key (to :data:`NORMAL_ATOL` on the normals). Differentiable in ``hidden``.
    """
    if isinstance(seed, int) and not isinstance(seed, bool):
        seed = torch.tensor([seed], dtype=torch.int64, device=hidden.device)
    if not isinstance(seed, torch.Tensor):
        raise TypeError(f"seed must be an int or an int64 tensor, got {type(seed).__name__}")
    seed = seed.reshape(1).to(hidden.device)
    sigma = float(sigma)
    _check(hidden, selected, seed, sigma, int(row_stride))
    op = noise_op(backend, hidden.device, hidden.dtype)
    return op(hidden.contiguous(), selected.contiguous(), seed, sigma, int(row_stride))
