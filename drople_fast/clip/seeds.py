"""The random-stream layout: which Philox key and counter every random draw of the patch uses.

This module is the one place that composes keys; everything random in the
patch (the IWTD drop mask, drop_fixed's Gumbel noise, perturb mode's normal
noise, per-element perturbation noise) goes through :func:`stream_key`.

Key (64 bits, the Philox4x32-10 key words ``(key & 0xffffffff, key >> 32)``)::

    key = mix64(IWTDConfig.seed)  XOR  (step << 12 | layer << 1 | tower)  XOR  (purpose << 60)

    bits  0       tower    0 vision, 1 text
    bits  1..11   layer    block index of the tower (< 2048)
    bits 12..59   step     1-based count of that tower's training forwards with IWTD (< 2**48)
    bits 60..63   purpose  ``drople_fast.ops.philox.PURPOSES``: 0 mask, 1 gumbel, 4 noise

* ``mix64`` is SplitMix64's output function, a bijection of the 64-bit
  integers, so the whole seed is used (seeds 0, 2**31 and 2**32 give
  different streams) and small neighbouring seeds land far apart.
* For one seed, the packed field is injective in (step, tower, layer,
  purpose) and XOR with a constant is a bijection: no two streams of a run
  coincide, whatever the depth of the towers (up to 2048 layers, 2**48 steps).
* The purpose field is the part the operator derives itself
  (:func:`drople_fast.ops.philox.stream`): ``iwtd`` receives the mask key,
  ``compact_fixed`` XORs in "gumbel", perturb mode "noise" (:func:`drople_fast.ops.noise.noise_key`).

Counter (64 bits, one per draw within a key), see :func:`drople_fast.ops.philox.token_offsets`::

    token (b, j):          b * row_stride + j          row_stride 0 means the sequence length S
    element (b, j, d):     (b * row_stride + j) * D + d    (per-element noise over the width D)

The text tower passes its untrimmed width as ``row_stride``, so trimming the
padding after the last EOS never changes a draw. ``j`` is the token's position
in the layer's current (possibly compacted) sequence.

The step counters live on the model (``PatchState.counters``) and are saved
by ``patch_state_dict``, so a resumed run continues the same streams.
"""
from __future__ import annotations

from typing import Union

import torch

from ..ops.philox import PURPOSE_SHIFT, PURPOSES, stream, to_int64

TOWERS = ("vision", "text")
TOWER_BITS = 1
LAYER_SHIFT = 1
LAYER_BITS = 11
STEP_SHIFT = LAYER_SHIFT + LAYER_BITS  # 12
STEP_BITS = PURPOSE_SHIFT - STEP_SHIFT  # 48
MAX_LAYERS = 1 << LAYER_BITS
MAX_STEPS = 1 << STEP_BITS

_MASK64 = (1 << 64) - 1

IntOrTensor = Union[int, torch.Tensor]


def check_seed(seed) -> int:
    """``seed`` as a Python int, or a ValueError naming it (any int in [-2**63, 2**64))."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"seed must fit in 64 bits ([-2**63, 2**64)), got {seed}")
    return seed


def mix64(seed: int) -> int:
    """SplitMix64 of ``seed`` (taken modulo 2**64): a bijection, returned as a signed int64."""
    z = (check_seed(seed) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return to_int64(z ^ (z >> 31))


def derive_seed(base: int, *parts: int) -> int:
    """A seed for one run of a sweep (``parts``: run seed, rank, ...), by chained :func:`mix64`.

    Unlike ``base + 1000 * seed + rank`` two different (base, parts) never share a seed by construction
    of the arithmetic; a collision is as unlikely as two random 64-bit values meeting.
    """
    key = mix64(base)
    for part in parts:
        key = mix64(to_int64(key ^ check_seed(part)))
    return key


def _tower_index(tower: str) -> int:
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    return TOWERS.index(tower)


def step_key(seed: int, step: IntOrTensor, tower: str) -> IntOrTensor:
    """The mask key of layer 0 of ``tower`` at training step ``step`` (an int or an int64 tensor).

    With a tensor step (the model's counter) the result is a tensor on the same
    device, computed without a host sync.
    """
    base = mix64(seed) ^ _tower_index(tower)
    if isinstance(step, torch.Tensor):
        return (step.to(torch.int64) << STEP_SHIFT) ^ base
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < MAX_STEPS:
        raise ValueError(f"step must be an int in [0, 2**{STEP_BITS}), got {step!r}")
    return to_int64((step << STEP_SHIFT) ^ base)


def layer_key(step_key_: IntOrTensor, layer: int) -> IntOrTensor:
    """The mask key of block ``layer`` given its tower's :func:`step_key`."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < MAX_LAYERS:
        raise ValueError(f"layer must be an int in [0, {MAX_LAYERS}), got {layer!r}")
    field = layer << LAYER_SHIFT
    return to_int64(step_key_ ^ field) if isinstance(step_key_, int) else step_key_ ^ field


def stream_key(seed: int, step: IntOrTensor, tower: str, layer: int, purpose: str = "mask") -> IntOrTensor:
    """The Philox key of stream ``purpose`` of block ``layer`` of ``tower`` at training step ``step``."""
    return stream(layer_key(step_key(seed, step, tower), layer), purpose)


__all__ = ["MAX_LAYERS", "MAX_STEPS", "PURPOSES", "TOWERS", "check_seed", "derive_seed", "layer_key", "mix64", "step_key",
           "stream", "stream_key"]
