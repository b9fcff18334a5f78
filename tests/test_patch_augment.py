"""The release's per-patch augmentation (release/data/randaugment.py, release/configs/patch_aug.json).

The release (MIT, /work/shared/release) is never imported: its numpy functions are transcribed below
(cv2 calls written out in numpy), each with the release file:line, and the torch implementation is
held to them bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from drople_fast.training.data import patch_augment as pa


# --------------------------------------------------------------------------
# golden: release/data/randaugment.py, transcribed (cv2.split/merge/calcHist/filter2D in numpy)
# --------------------------------------------------------------------------


def g_autocontrast(img):  # release/data/randaugment.py:10-40, cutoff=0
    def tune(ch):
        high, low = ch.max(), ch.min()
        if high <= low:
            table = np.arange(256)
        else:
            scale = 255 / (high - low)
            offset = -int(low) * scale
            table = np.arange(256) * scale + offset
            table[table < 0] = 0
            table[table > 255] = 255
        return table.clip(0, 255).astype(np.uint8)[ch]
    return np.stack([tune(img[..., c]) for c in range(3)], -1)


def g_equalize(img):  # release/data/randaugment.py:43-63
    def tune(ch):
        hist = np.bincount(ch.ravel(), minlength=256).astype(np.float32)  # cv2.calcHist: float32
        non_zero_hist = hist[hist != 0].reshape(-1)
        step = np.sum(non_zero_hist[:-1]) // 255
        if step == 0:
            return ch
        n = np.empty_like(hist)
        n[0] = step // 2
        n[1:] = hist[:-1]
        return (np.cumsum(n) // step).clip(0, 255).astype(np.uint8)[ch]
    return np.stack([tune(img[..., c]) for c in range(3)], -1)


def g_color(img, factor):  # release/data/randaugment.py:87-108
    M = (np.float32([[0.886, -0.114, -0.114], [-0.587, 0.413, -0.587], [-0.299, -0.299, 0.701]]) * factor
         + np.float32([[0.114], [0.587], [0.299]]))
    return np.matmul(img, M).clip(0, 255).astype(np.uint8)


def g_contrast(img, factor):  # release/data/randaugment.py:111-121
    mean = np.sum(np.mean(img, axis=(0, 1)) * np.array([0.114, 0.587, 0.299]))
    table = np.array([(el - mean) * factor + mean for el in range(256)]).clip(0, 255).astype(np.uint8)
    return table[img]


def g_brightness(img, factor):  # release/data/randaugment.py:124-130
    table = (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)
    return table[img]


def g_sharpness(img, factor):  # release/data/randaugment.py:133-147
    kernel = np.ones((3, 3), dtype=np.float32)
    kernel[1][1] = 5
    kernel /= 13
    # cv2.filter2D(img, -1, kernel) on the interior (the border rows/columns are overwritten by
    # nothing: only [1:-1, 1:-1] of it is used), float32 sum rounded to nearest (saturate_cast)
    f = img.astype(np.float32)
    h, w = img.shape[:2]
    acc = np.zeros((h - 2, w - 2, 3), np.float32)
    for dy in range(3):
        for dx in range(3):
            acc += kernel[dy, dx] * f[dy:h - 2 + dy, dx:w - 2 + dx]
    degenerate_inner = np.rint(acc).clip(0, 255).astype(np.float32)
    out = img.astype(np.float32)
    out[1:-1, 1:-1, :] = degenerate_inner + factor * (out[1:-1, 1:-1, :] - degenerate_inner)
    with np.errstate(invalid="ignore"):
        return out.astype(np.uint8)


GOLDEN = {"AutoContrast": lambda x, f: g_autocontrast(x), "Equalize": lambda x, f: g_equalize(x),
          "Color": g_color, "Contrast": g_contrast, "Brightness": g_brightness, "Sharpness": g_sharpness,
          "Identity": lambda x, f: x}


def patches_np(n, seed, size=16):
    """Random patches plus the cases that decide roundings: grey pixels, flat channels, narrow ranges,
    a single brightest pixel (Equalize's non-zero step)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    x[: n // 4] = x[: n // 4, ..., :1]  # grey
    x[n // 4: n // 2] = (rng.integers(100, 110, (n // 4, size, size, 3))).astype(np.uint8)  # narrow range
    x[n // 2, ..., 1] = 77  # one flat channel
    lo = x[n // 2 + 1: 3 * n // 4] // 2  # values < 128 ...
    lo[:, 3, 5, :] = 250  # ... and one brightest pixel per channel
    x[n // 2 + 1: 3 * n // 4] = lo
    return x


def to_t(x):
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()


def to_np(t):
    return t.permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------
# the config and the ops
# --------------------------------------------------------------------------


def test_release_config():
    # release/configs/patch_aug.json: 16x16 patches, stride 16, N=2, M=7, these seven ops in this order
    assert pa.PATCH_SIZE == 16 and pa.NUM_OPS == 2 and pa.MAGNITUDE == 7
    assert pa.OPS == ("Identity", "AutoContrast", "Equalize", "Brightness", "Contrast", "Color", "Sharpness")
    # release/data/randaugment.py:205-208 with MAX_LEVEL 10 (:279): level 7 -> 0.7 * 1.8 + 0.1
    assert pa.enhance_factor(7) == (7 / 10) * 1.8 + 0.1
    assert abs(pa.enhance_factor(7) - 1.36) < 1e-12


@pytest.mark.parametrize("size", [16, 12])  # 12: divisions that are not exact in binary
@pytest.mark.parametrize("name", pa.OPS)
def test_op_matches_release_bitwise(name, size):
    x = patches_np(64, seed=sum(map(ord, name)), size=size)
    factor = pa.enhance_factor(pa.MAGNITUDE)
    gold = np.stack([GOLDEN[name](p, factor) for p in x])
    ours = to_np(pa.FUNCTIONS[name](to_t(x), factor))
    assert ours.dtype == np.uint8
    assert np.array_equal(ours, gold), f"{name}: {(ours != gold).sum()} values differ"


def test_brightness_table_at_magnitude_7():
    # release/data/randaugment.py:124-130: float32 arange(256) * 1.36, clipped, truncated:
    # 100 -> 136, 187 -> 254 (254.32), 188 -> 255 (255.68 clipped)
    x = torch.tensor([0, 1, 100, 187, 188, 255], dtype=torch.uint8).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = pa.brightness(x.contiguous(), pa.enhance_factor(7))[0, 0, 0].tolist()
    assert out == [0, 1, 136, 254, 255, 255]


def test_sharpness_wraps_like_the_release():
    # release/data/randaugment.py:146 casts float32 to uint8 without clipping: numpy on x86 truncates
    # and wraps. A bright centre on a dark patch overshoots 255 and wraps to a small value.
    x = np.zeros((1, 5, 5, 3), np.uint8)
    x[0, 2, 2] = 255
    gold = g_sharpness(x[0], 1.36)
    ours = to_np(pa.sharpness(to_t(x), 1.36))[0]
    assert np.array_equal(ours, gold)
    # smooth centre round(5 * 255 / 13) = 98; 98 + 1.36 * (255 - 98) = 311.52 -> 311 -> 311 - 256 = 55
    assert ours[2, 2, 0] == 55
    # the patch's outermost rows and columns keep their values
    assert (ours[0] == 0).all() and (ours[:, 0] == 0).all()


# --------------------------------------------------------------------------
# per-patch application
# --------------------------------------------------------------------------


def release_patch_augment(img, choices, ops, factor, size=16):
    """release/data/randaugment.py:338-368 with the random draws given: patches row-major from the top
    left, ops in turn, each patch written back."""
    img = img.copy()
    h, w = img.shape[:2]
    p = 0
    for y in range(0, h - size + 1, size):
        for x in range(0, w - size + 1, size):
            patch = img[y:y + size, x:x + size].copy()
            for k in choices[p]:
                patch = GOLDEN[ops[k]](patch, factor)
            img[y:y + size, x:x + size] = patch
            p += 1
    return img


def test_patches_independent_and_match_release():
    # 40x56: a 2x3 grid of full patches plus an 8-pixel margin the release leaves alone (:345-346)
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    aug = pa.PatchRandAugment()
    g = torch.Generator().manual_seed(5)
    out = aug(torch.from_numpy(img).permute(2, 0, 1).contiguous(), generator=g)
    choices = pa.sample_ops(6, 2, len(pa.OPS), torch.Generator().manual_seed(5)).tolist()
    gold = release_patch_augment(img, choices, pa.OPS, pa.enhance_factor(7))
    assert np.array_equal(out.permute(1, 2, 0).numpy(), gold)
    assert np.array_equal(out.permute(1, 2, 0).numpy()[32:], img[32:])
    assert np.array_equal(out.permute(1, 2, 0).numpy()[:, 48:], img[:, 48:])
    # independence: over many images, every patch position draws every op (not one draw per image)
    draws = pa.sample_ops(196, 2, 7, torch.Generator().manual_seed(0))
    assert len({tuple(r) for r in draws.tolist()}) > 30
    assert set(draws.flatten().tolist()) == set(range(7))


def test_patch_augment_reproducible_from_global_seed():
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = pa.PatchRandAugment()
    torch.manual_seed(11)
    a = aug(img)
    torch.manual_seed(11)
    b = aug(img)
    torch.manual_seed(12)
    c = aug(img)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown"):
        pa.PatchRandAugment(ops=("Rotate",))
    with pytest.raises(ValueError, match="uint8"):
        pa.PatchRandAugment()(torch.zeros(3, 16, 16))


# --------------------------------------------------------------------------
# the PIL reference the release names
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize"])
def test_autocontrast_equalize_per_patch_match_pil(name):
    # release/data/randaugment.py:10-12 and :43-47 say their AutoContrast / Equalize give "same output
    # as PIL.ImageOps.autocontrast / equalize"; the vectorised per-patch versions match PIL on every patch
    from PIL import Image, ImageOps

    pil_op = {"AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize}[name]
    x = patches_np(64, seed=7)
    ours = to_np(pa.FUNCTIONS[name](to_t(x), pa.enhance_factor(7)))
    for i, p in enumerate(x):
        assert np.array_equal(ours[i], np.asarray(pil_op(Image.fromarray(p)))), i


def test_whole_image_autocontrast_equalize_match_a_pil_patch_loop():
    # release/data/randaugment.py:338-368 run with only AutoContrast and Equalize: every 16x16 patch of a
    # 224x224 image gets its own 2 draws, and the result equals PIL's ops applied patch by patch
    from PIL import Image, ImageOps

    ops = ("AutoContrast", "Equalize")
    rng = np.random.default_rng(4)
    img = (rng.integers(0, 64, (224, 224, 3)) + np.linspace(0, 180, 224)[:, None, None]).astype(np.uint8)
    out = pa.PatchRandAugment(ops=ops)(torch.from_numpy(img).permute(2, 0, 1).contiguous(),
                                       generator=torch.Generator().manual_seed(9))
    choices = pa.sample_ops(196, 2, 2, torch.Generator().manual_seed(9)).tolist()
    pil = {"AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize}
    want = img.copy()
    for p, (y, x) in enumerate((y, x) for y in range(0, 224, 16) for x in range(0, 224, 16)):
        patch = Image.fromarray(want[y:y + 16, x:x + 16].copy())
        for k in choices[p]:
            patch = pil[ops[k]](patch)
        want[y:y + 16, x:x + 16] = np.asarray(patch)
    assert len({tuple(c) for c in choices}) == 4  # all four (op, op) pairs occur: independent draws
    assert np.array_equal(out.permute(1, 2, 0).numpy(), want)
