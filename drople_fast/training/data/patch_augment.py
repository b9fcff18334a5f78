"""The release's per-patch RandAugment, vectorised over patches in torch.

The release augments the student's image patch by patch
(release/data/randaugment.py:329-368, ``PatchRandomAugment``) with the settings of
release/configs/patch_aug.json: 16x16 patches at stride 16, ``N=2`` operations of magnitude
``M=7`` per patch, each drawn uniformly with replacement (``np.random.choice(augs, N)``,
release/data/randaugment.py:316-318) from Identity, AutoContrast, Equalize, Brightness,
Contrast, Color, Sharpness, applied one after the other with no skip probability (the
``prob`` check is commented out, :323-324 and :356-357). Every patch draws its own ops
(:350-355). Patches tile the image from the top-left corner; pixels beyond the last full
patch are left alone (:345-346).

Each operation below reproduces the release's numpy/cv2 function on uint8 values,
including its arithmetic (float32 or float64, truncating casts). Two properties of the
release are kept on purpose because they are what its runs trained with:

* Color and Contrast weight the channels ``(0.114, 0.587, 0.299)``, cv2's BGR luma weights,
  although the image is RGB (release/data/randaugment.py:97-104, :114);
* Sharpness casts its float32 result to uint8 without clipping (:146), which on x86 numpy
  truncates toward zero and wraps modulo 256 (a value of 260.4 becomes 4, -3.2 becomes 253).

Randomness comes from torch's global generator (or ``generator``), as torchvision's
transforms do, so a data loader's seeding makes it reproducible (workers are seeded per
worker by the loader).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch

# release/configs/patch_aug.json
PATCH_SIZE = 16
NUM_OPS = 2
MAGNITUDE = 7
OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Contrast", "Color", "Sharpness")
# release/data/randaugment.py:279
MAX_LEVEL = 10
# Below this many patches a side (an image under 128 px at 16-px patches) the per-patch colour ops no longer
# perturb parts of an object: Color, Equalize and AutoContrast recolour whole objects or the whole image, and
# the student trains on noise (a 32-px toy CLIP sees 2 x 2 patches; CLIP at 224 px sees 14 x 14).
MIN_GRID = 8
# release/data/randaugment.py:97-104, :114: cv2's BGR luma weights, applied to RGB channels
_LUMA = (0.114, 0.587, 0.299)
_COLOR_A = ((0.886, -0.114, -0.114), (-0.587, 0.413, -0.587), (-0.299, -0.299, 0.701))


def enhance_factor(level: float, max_level: float = MAX_LEVEL) -> float:
    """release/data/randaugment.py:205-208: ``(level / MAX_LEVEL) * 1.8 + 0.1`` (1.36 at level 7)."""
    return (level / max_level) * 1.8 + 0.1


# --------------------------------------------------------------------------
# operations on a batch of uint8 patches (P, C, h, w)
# --------------------------------------------------------------------------


def identity(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x


def autocontrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """release/data/randaugment.py:10-40 with cutoff 0: per channel, map [min, max] to [0, 255]
    in float64 (``v * scale + offset``), clip, truncate; a flat channel is left alone."""
    flat = x.flatten(2)
    lo = flat.amin(-1).double()[..., None, None]
    hi = flat.amax(-1).double()[..., None, None]
    flat_channel = hi <= lo
    # a true division (``255.0 / tensor`` in torch multiplies by the reciprocal: off by an ulp)
    scale = torch.full_like(hi, 255.0) / torch.where(flat_channel, torch.ones_like(hi), hi - lo)
    offset = (-lo) * scale
    out = (x.double() * scale + offset).clamp_(0, 255).to(torch.uint8)
    return torch.where(flat_channel, x, out)


def equalize(x: torch.Tensor, factor: float) -> torch.Tensor:
    """release/data/randaugment.py:43-63 (PIL's equalize): per channel, ``step`` = pixels outside the
    highest occupied bin // 255; zero step leaves the channel alone; else
    ``table = cumsum([step // 2, hist[:-1]]) // step``. All integers, so exact."""
    P, C = x.shape[:2]
    v = x.reshape(P * C, -1).long()
    hist = torch.zeros(P * C, 256, dtype=torch.long).scatter_add_(1, v, torch.ones_like(v))
    top = hist.gather(1, v.amax(1, keepdim=True))
    step = (v.shape[1] - top) // 255
    safe = step.clamp(min=1)
    n = torch.cat([safe // 2, hist[:, :-1]], dim=1)
    table = (n.cumsum(1) // safe).clamp_(0, 255)
    out = torch.where(step > 0, table.gather(1, v), v)
    return out.to(torch.uint8).reshape(x.shape)


def brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """release/data/randaugment.py:124-130: float32 table ``arange(256) * factor``, clipped, truncated."""
    table = (torch.arange(256, dtype=torch.float32) * torch.tensor(factor, dtype=torch.float32)).clamp_(0, 255)
    return table.to(torch.uint8)[x.long()]


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """release/data/randaugment.py:111-121: ``mean`` = luma-weighted (BGR weights) mean of the patch's
    channel means in float64; table ``(v - mean) * factor + mean`` in float64, clipped, truncated."""
    sums = x.flatten(2).sum(-1).double()
    means = sums / torch.full_like(sums, x.shape[2] * x.shape[3])  # a true division, as numpy's mean
    mean = (means[:, 0] * _LUMA[0] + means[:, 1] * _LUMA[1]) + means[:, 2] * _LUMA[2]
    mean = mean[:, None, None, None]
    return ((x.double() - mean) * factor + mean).clamp_(0, 255).to(torch.uint8)


def color(x: torch.Tensor, factor: float) -> torch.Tensor:
    """release/data/randaugment.py:87-108: ``img @ M`` with the float32 matrix
    ``M = A * factor + luma`` (per pixel ``out_j = sum_i img_i M_ij``), clipped, truncated.

    numpy's float32 matmul accumulates as a fused multiply-add chain
    ``fma(x2, M2j, fma(x1, M1j, x0 * M0j))``; on grey pixels the exact result is an integer, so
    the rounding decides the truncated value (plain float32 sums differ from numpy on about a
    quarter of grey pixels). Each fma is computed exactly in float64 (a product of a uint8 and a
    float32 needs 32 bits, and the sum spans under 40) and rounded once to float32."""
    m = (torch.tensor(_COLOR_A, dtype=torch.float32) * torch.tensor(factor, dtype=torch.float32)
         + torch.tensor(_LUMA, dtype=torch.float32)[:, None]).double()
    xd = x.double()
    outs = []
    for j in range(3):
        acc = (xd[:, 0] * m[0, j]).float()
        acc = (xd[:, 1] * m[1, j] + acc.double()).float()
        acc = (xd[:, 2] * m[2, j] + acc.double()).float()
        outs.append(acc)
    return torch.stack(outs, dim=1).clamp_(0, 255).to(torch.uint8)


def sharpness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """release/data/randaugment.py:133-147: the smoothed image is cv2.filter2D with the 3x3 kernel
    (1 1 1; 1 5 1; 1 1 1) / 13 rounded to uint8 (the exact sum / 13 is never within 1/26 of a
    half, so integer rounding is exact); only the interior (not the outermost row and column of
    the patch) becomes ``smooth + factor * (img - smooth)`` in float32, cast to uint8 unclipped
    (truncate toward zero, wrap modulo 256: numpy's float32 -> uint8 cast on x86)."""
    if factor == 1.0:
        return x
    h, w = x.shape[2], x.shape[3]
    if h < 3 or w < 3:
        return x
    xf = x.float()
    # the integer window sum (at most 13 * 255: exact in float32) as a separable 3x3 box plus 4 x centre
    rows = xf[..., :-2] + xf[..., 1:-1] + xf[..., 2:]
    s = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:] + 4 * xf[:, :, 1:-1, 1:-1]
    # round(s / 13) = floor((2s + 13) / 26); the quotient is never within 1/26 of an integer
    smooth = torch.floor((2 * s + 13) / 26)
    inner = smooth + torch.tensor(factor, dtype=torch.float32) * (xf[:, :, 1:-1, 1:-1] - smooth)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = (inner.to(torch.int32) & 255).to(torch.uint8)
    return out


FUNCTIONS = {"Identity": identity, "AutoContrast": autocontrast, "Equalize": equalize, "Brightness": brightness,
             "Contrast": contrast, "Color": color, "Sharpness": sharpness}


# --------------------------------------------------------------------------
# the per-patch augmentation
# --------------------------------------------------------------------------


def to_patches(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, H, W) -> (P, C, s, s), row-major over the full patches from the top-left corner."""
    C, H, W = image.shape
    gh, gw = H // patch_size, W // patch_size
    x = image[:, :gh * patch_size, :gw * patch_size].reshape(C, gh, patch_size, gw, patch_size)
    return x.permute(1, 3, 0, 2, 4).reshape(gh * gw, C, patch_size, patch_size)


def from_patches(patches: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_patches`: a copy of ``image`` with its full patches replaced."""
    C, H, W = image.shape
    s = patches.shape[-1]
    gh, gw = H // s, W // s
    out = image.clone()
    out[:, :gh * s, :gw * s] = patches.reshape(gh, gw, C, s, s).permute(2, 0, 3, 1, 4).reshape(C, gh * s, gw * s)
    return out


def sample_ops(num_patches: int, num_ops: int, num_choices: int,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(P, N) op indices, uniform with replacement per patch (release/data/randaugment.py:316-318)."""
    return torch.randint(num_choices, (num_patches, num_ops), generator=generator)


def apply_patch_ops(patches: torch.Tensor, choices: torch.Tensor, ops: Sequence[str], magnitude: float) -> torch.Tensor:
    """Apply op ``ops[choices[p, n]]`` to patch p for n = 0, 1, ... in turn (batched per op)."""
    factor = enhance_factor(magnitude)
    x = patches
    for n in range(choices.shape[1]):
        for k, name in enumerate(ops):
            if name == "Identity":
                continue
            idx = (choices[:, n] == k).nonzero().flatten()
            if idx.numel():
                x = x.clone() if x is patches else x
                x.index_copy_(0, idx, FUNCTIONS[name](x.index_select(0, idx), factor))
    return x


class SmallPatchGridWarning(UserWarning):
    """The per-patch augmentation sees fewer than :data:`MIN_GRID` patches a side."""


_warned = set()


def check_patch_grid(height: int, width: int, patch_size: int = PATCH_SIZE) -> bool:
    """True if a ``height`` x ``width`` image has at least :data:`MIN_GRID` patches a side; otherwise warn
    once per (size, patch size) in this process, one line naming the fix, and return False."""
    gh, gw = height // patch_size, width // patch_size
    if min(gh, gw) >= MIN_GRID:
        return True
    key = (height, width, patch_size)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"per-patch augmentation on {height}x{width} images sees {gh}x{gw} patches of {patch_size} "
                      f"px (the release's recipe: 14x14 at 224 px); under {MIN_GRID}x{MIN_GRID} its colour ops "
                      f"erase whole objects: use a model input of at least {MIN_GRID * patch_size} px, or "
                      "augment='none' (--augment none)", SmallPatchGridWarning, stacklevel=3)
    return False


class PatchRandAugment:
    """The release's ``PatchRandomAugment`` on a (C, H, W) uint8 tensor; returns a new uint8 tensor.
    Images with fewer than :data:`MIN_GRID` patches a side are augmented as the release would, after a
    one-time :class:`SmallPatchGridWarning` (:func:`check_patch_grid`)."""

    def __init__(self, patch_size: int = PATCH_SIZE, num_ops: int = NUM_OPS, magnitude: float = MAGNITUDE,
                 ops: Sequence[str] = OPS):
        unknown = [o for o in ops if o not in FUNCTIONS]
        if unknown or not ops:
            raise ValueError(f"unknown patch augmentation op(s) {unknown}; known: {list(FUNCTIONS)}")
        if patch_size < 1 or num_ops < 0 or not 0 <= magnitude <= MAX_LEVEL:
            raise ValueError(f"need patch_size >= 1, num_ops >= 0, 0 <= magnitude <= {MAX_LEVEL}; got "
                             f"{patch_size}, {num_ops}, {magnitude}")
        self.patch_size, self.num_ops, self.magnitude, self.ops = patch_size, num_ops, magnitude, tuple(ops)

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if image.dtype != torch.uint8 or image.dim() != 3:
            raise ValueError(f"expected a (C, H, W) uint8 image, got {tuple(image.shape)} {image.dtype}")
        check_patch_grid(image.shape[1], image.shape[2], self.patch_size)
        patches = to_patches(image, self.patch_size)
        if patches.shape[0] == 0:
            return image.clone()
        choices = sample_ops(patches.shape[0], self.num_ops, len(self.ops), generator)
        return from_patches(apply_patch_ops(patches, choices, self.ops, self.magnitude), image)

    def __repr__(self) -> str:
        return (f"PatchRandAugment(patch_size={self.patch_size}, num_ops={self.num_ops}, "
                f"magnitude={self.magnitude}, ops={list(self.ops)})")
