"""Philox4x32-10 in plain PyTorch, bit-identical to Triton's ``tl.rand``.

Every backend (reference, C++, Triton) draws the IWTD Bernoulli mask from the
same counter-based generator indexed by ``(key, counter)`` with
``counter = sample * row_stride + token``; that is what makes a drop mask
reproducible on any device. This file is the specification the C++ and Triton
kernels are tested against (``csrc/philox.h`` and ``tl.rand`` respectively).
The whole random-stream layout (which key a layer of a training step uses,
which purpose field a derived stream sets, the counter layout) is documented
in one place, :mod:`drople_fast.clip.seeds`; the operator-level half of it
(the purpose field and the counters) lives here because the operator derives
its own streams from the key it is given.

Torch has no uint32 arithmetic on every device, so words are held in int64
and reduced modulo 2**32; 32x32-bit products are split into 16-bit limbs so
that nothing overflows int64.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
N_ROUNDS = 10
# Largest float32 such that (2**31 - 1) * scale < 1 (Triton's uint_to_uniform_float).
UNIFORM_SCALE = 4.6566127342e-10
# Purpose field: the top 4 bits of a 64-bit Philox key (see drople_fast.clip.seeds). A layer's key
# has purpose 0 ("mask"); every other stream of that layer is the key with its purpose XOR-ed in.
PURPOSE_SHIFT = 60
PURPOSES = {
    "mask": 0,  # the IWTD Bernoulli drop mask (all backends)
    "gumbel": 1,  # drop_fixed: Gumbel-top-k noise
    # perturb mode's per-element normal noise (drople_fast.ops.noise): Box-Muller on words c0 and c1
    # of one Philox call per element, as tl.randn does (2 and 3 were the retired per-token streams)
    "noise": 4,
}


def _mul_lo_hi(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high 32-bit words of ``const * x`` for a 32-bit constant."""
    c_hi, c_lo = const >> 16, const & 0xFFFF
    x_hi, x_lo = x >> 16, x & 0xFFFF
    lo_lo = c_lo * x_lo
    mid = c_hi * x_lo + c_lo * x_hi + (lo_lo >> 16)
    hi = c_hi * x_hi + (mid >> 16)
    lo = (c_lo * x + ((c_hi * x) & 0xFFFF) * 65536) & MASK32
    return lo, hi & MASK32


def philox4x32(seed: torch.Tensor | int, counter: torch.Tensor) -> torch.Tensor:
    """First output word of Philox4x32-10 for counters ``(counter_lo, counter_hi, 0, 0)``.

    ``seed`` is a 64-bit key (int or int64 tensor broadcastable to ``counter``);
    ``counter`` an int64 tensor. Returns uint32 values held in int64.
    """
    return philox4x32_words(seed, counter)[0]


def philox4x32_words(seed: torch.Tensor | int, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All four output words ``(c0, c1, c2, c3)`` of Philox4x32-10 (Triton's ``randint4x``)."""
    seed = torch.as_tensor(seed, dtype=torch.int64, device=counter.device)
    k0 = seed & MASK32
    k1 = (seed >> 32) & MASK32
    c0 = counter & MASK32
    c1 = (counter >> 32) & MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(N_ROUNDS):
        lo_b, hi_b = _mul_lo_hi(ROUND_B, c2)
        lo_a, hi_a = _mul_lo_hi(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + KEY_A) & MASK32
        k1 = (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def uniform_from_uint32(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float``: uint32 (in int64) -> float32 in [0, 1)."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    signed = torch.where(signed < 0, -signed - 1, signed).to(torch.int32)
    return signed.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def to_int64(value: int) -> int:
    """``value`` modulo 2**64 as a signed int64 (the two's-complement view every backend uses)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def token_offsets(batch: int, seq: int, device=None, row_stride: int = 0) -> torch.Tensor:
    """(B, S) Philox counters ``b * row_stride + j`` (row_stride 0 means S).

    The text tower passes its untrimmed width as ``row_stride``, so trimming the
    padding after the last EOS never changes a draw.
    """
    stride = row_stride if row_stride > 0 else seq
    return (torch.arange(batch, device=device, dtype=torch.int64)[:, None] * stride
            + torch.arange(seq, device=device, dtype=torch.int64)[None, :])


def _token_uniform(seed: torch.Tensor | int, batch: int, seq: int, device=None, row_stride: int = 0) -> torch.Tensor:
    return uniform_from_uint32(philox4x32(seed, token_offsets(batch, seq, device, row_stride)))


# A custom op, so torch.compile treats the generator as one opaque call: inductor
# would otherwise fuse the ten unrolled rounds into one huge expression (minutes of compile).
@torch.library.custom_op("drople_fast::token_uniform", mutates_args=())
def _token_uniform_op(seed: torch.Tensor, batch: int, seq: int, row_stride: int = 0) -> torch.Tensor:
    return _token_uniform(seed.reshape(()), batch, seq, seed.device, row_stride)


@_token_uniform_op.register_fake
def _(seed, batch, seq, row_stride=0):
    return seed.new_empty((batch, seq), dtype=torch.float32)


def token_uniform(seed: torch.Tensor | int, batch: int, seq: int, device=None, row_stride: int = 0) -> torch.Tensor:
    """Uniform draws (B, S) float32 at offsets ``b * row_stride + j`` (row_stride 0 means S), as every backend uses."""
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=seed.device if device is None else device, dtype=torch.int64).reshape(1)
        return _token_uniform_op(seed, batch, seq, row_stride)
    return _token_uniform(seed, batch, seq, device, row_stride)


def stream(key: torch.Tensor | int, purpose: str) -> torch.Tensor | int:
    """The key of stream ``purpose`` (see :data:`PURPOSES`) derived from a layer's mask key."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {tuple(PURPOSES)}, got {purpose!r}")
    field = to_int64(PURPOSES[purpose] << PURPOSE_SHIFT)
    return to_int64(key ^ field) if isinstance(key, int) else key ^ field


def gumbel_seed(seed: torch.Tensor | int) -> torch.Tensor | int:
    """The key of the fixed-budget (Gumbel-top-k) stream for a given IWTD seed."""
    return stream(seed, "gumbel")

