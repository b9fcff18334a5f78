"""A small, learnable dataset in the CoOp layout, generated on disk.

Each class is a (colour, pattern) pair such as "red circle" or "blue stripes";
images vary in placement, size, colour jitter, background and pixel noise, so
a classifier has to learn colour and shape but a tiny model can. Everything
is drawn from ``numpy.random.default_rng(seed)``, so the files are identical
for the same arguments on any machine.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
from PIL import Image

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 220, 40),
    "magenta": (210, 50, 210),
    "cyan": (40, 210, 220),
    "white": (235, 235, 235),
    "orange": (240, 140, 30),
}
PATTERNS = ("circle", "square", "triangle", "cross", "ring", "stripes", "checkers", "dots")
MAX_CLASSES = len(COLORS) * len(PATTERNS)


def class_names(num_classes: int) -> List[str]:
    """Class k = colour k mod 8 with pattern (k + k // 8) mod 8: the first eight
    classes differ in both colour and pattern, and all 64 pairs are distinct."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    colors = list(COLORS)
    n_c, n_p = len(colors), len(PATTERNS)
    return [f"{colors[k % n_c]} {PATTERNS[(k % n_c + k // n_c) % n_p]}" for k in range(num_classes)]


def _pattern_mask(pattern: str, size: int, rng: np.random.Generator,
                  scale: Tuple[float, float] = (0.2, 0.32)) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = rng.uniform(*scale) * size
    cy, cx = rng.uniform(r, size - r, size=2)
    dy, dx = yy - cy, xx - cx
    if pattern == "circle":
        return dx**2 + dy**2 <= r**2
    if pattern == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if pattern == "triangle":  # apex up, base at cy + r
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    if pattern == "cross":
        w = max(1.0, r * 0.3)
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
        return inside & ((np.abs(dx) <= w) | (np.abs(dy) <= w))
    if pattern == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (r * 0.55) ** 2)
    # textures cover the whole image; period and phase vary per image
    period = rng.uniform(0.14, 0.25) * size
    phase = rng.uniform(0, period, size=2)
    if pattern == "stripes":
        return ((yy + phase[0]) % period) < period / 2
    if pattern == "checkers":
        return ((((yy + phase[0]) // (period / 2)) + ((xx + phase[1]) // (period / 2))) % 2) == 0
    if pattern == "dots":
        py, px = (yy + phase[0]) % period - period / 2, (xx + phase[1]) % period - period / 2
        return py**2 + px**2 <= (period * 0.25) ** 2
    raise ValueError(f"unknown pattern {pattern!r}")


@dataclass(frozen=True)
class Domain:
    """How a set of images is photographed: the shift between the toy CLIP's pre-training images and
    a downstream dataset (real CLIPs meet such shifts: a dataset's own lighting, framing, clutter).

    ``background``: range of the background's grey level; ``gradient``: amplitude of a linear
    background ramp in a random direction; ``cast``: an RGB offset added to the whole image (a white
    balance of the dataset's camera); ``scale``: the object's radius as a fraction of the image;
    ``color_jitter`` / ``noise``: std of the object's colour and of per-pixel noise; ``clutter``:
    grey distractor discs per image.
    """

    name: str
    background: Tuple[float, float] = (10.0, 90.0)
    gradient: float = 0.0
    cast: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: Tuple[float, float] = (0.2, 0.32)
    color_jitter: float = 15.0
    noise: float = 12.0
    clutter: int = 0


# The original look (every test's data): dark plain backgrounds, large objects, strong pixel noise.
PLAIN = Domain("plain")
# The demo's two worlds. "web": what the toy CLIP is pre-trained on. "downstream": the few-shot
# dataset, shot differently: a warm colour cast, brighter ramped backgrounds, smaller objects, clutter.
# No pixel noise in either: per-patch AutoContrast and Equalize stretch a noisy flat patch to full-range
# noise, which no 224-px photo's patch of sky or wall turns into; a flat patch they leave alone.
WEB = Domain("web", background=(10.0, 80.0), scale=(0.22, 0.34), noise=0.0)
DOWNSTREAM = Domain("downstream", background=(70.0, 150.0), gradient=40.0, cast=(45.0, 15.0, -40.0),
                    scale=(0.14, 0.24), noise=0.0, clutter=2)
DOMAINS = {d.name: d for d in (PLAIN, WEB, DOWNSTREAM)}


def _domain(domain) -> Domain:
    if isinstance(domain, Domain):
        return domain
    if domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; expected one of {list(DOMAINS)}")
    return DOMAINS[domain]


def render_image(classname: str, size: int, rng: np.random.Generator, domain="plain") -> np.ndarray:
    """One (size, size, 3) uint8 image of ``classname`` ("<colour> <pattern>") in ``domain``
    (a :class:`Domain` or its name)."""
    d = _domain(domain)
    color_name, pattern = classname.split(" ", 1)
    background = rng.uniform(*d.background) + rng.normal(0, 8, size=3)
    img = np.broadcast_to(background, (size, size, 3)).astype(np.float32).copy()
    if d.gradient:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
        angle = rng.uniform(0, 2 * np.pi)
        img += (d.gradient * (np.cos(angle) * xx + np.sin(angle) * yy))[..., None]
    for _ in range(d.clutter):
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        r = rng.uniform(0.05, 0.1) * size
        cy, cx = rng.uniform(r, size - r, size=2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = rng.uniform(60, 200)
    color = np.asarray(COLORS[color_name], dtype=np.float32) + rng.normal(0, d.color_jitter, size=3)
    img[_pattern_mask(pattern, size, rng, d.scale)] = color
    img += np.asarray(d.cast, dtype=np.float32)
    if d.noise:
        img += rng.normal(0, d.noise, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _split_counts(n: int) -> Tuple[int, int, int]:
    n_val = max(1, round(0.2 * n))
    n_test = max(1, round(0.3 * n))
    return n - n_val - n_test, n_val, n_test


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.replace("-", "_").split("_") if part)


def write_synthetic_coop_dataset(
    root: str,
    name: str = "synthetic",
    num_classes: int = 8,
    images_per_class: int = 20,
    image_size: int = 32,
    seed: int = 0,
    domain="plain",
) -> str:
    """Write ``<root>/<name>/images/<class>/<i>.png`` and
    ``<root>/<name>/split_zhou_<Name>.json``; return ``<root>/<name>``.

    Each class's images are split 50/20/30 into train/val/test (at least one
    each, so ``images_per_class >= 3``). With the default name the result is
    readable by ``get_dataset("synthetic", root)``; any name works with
    ``load_split_json_dataset(<root>/<name>, image_dir="images")``.
    """
    if images_per_class < 3:
        raise ValueError(f"images_per_class must be >= 3 (one per split), got {images_per_class}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    names = class_names(num_classes)
    domain = _domain(domain)
    rng = np.random.default_rng(seed)
    dataset_dir = os.path.join(root, name)
    image_dir = os.path.join(dataset_dir, "images")
    n_train, n_val, _ = _split_counts(images_per_class)
    split = {"train": [], "val": [], "test": []}
    for label, classname in enumerate(names):
        folder = classname.replace(" ", "_")
        os.makedirs(os.path.join(image_dir, folder), exist_ok=True)
        for i in range(images_per_class):
            rel = f"{folder}/{i:04d}.png"
            Image.fromarray(render_image(classname, image_size, rng, domain)).save(os.path.join(image_dir, rel))
            which = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            split[which].append([rel, label, classname])
    with open(os.path.join(dataset_dir, f"split_zhou_{_camel(name)}.json"), "w", encoding="utf-8") as f:
        json.dump(split, f, indent=1)
    return dataset_dir
