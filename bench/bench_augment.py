"""Images per second of the training transforms on one CPU thread (a data-loader worker's budget).

    PYTHONPATH=. python bench/bench_augment.py [--size 224] [--n 200]

Times each transform on the same synthetic photo-sized PIL images (500x375, smooth content plus
noise, so the histogram ops see realistic value ranges): the release's per-patch augmentation (student
view plus the clean teacher view), the clean views alone, and the former RandomResizedCrop + flip +
RandAugment.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from drople_fast.training.data.transforms import eval_transform, train_views
from smoke import env_int


def images(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500]
    out = []
    for _ in range(n):
        f = rng.uniform(0.005, 0.05, 3)
        base = 127 + 100 * np.sin(xx[..., None] * f + yy[..., None] * f[::-1] + rng.uniform(0, 6, 3))
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(img))
    return out


def rate(transform, pics, repeat: int = 2) -> float:
    transform(pics[0])
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        for p in pics:
            transform(p)
        best = max(best, len(pics) / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n", type=int, default=env_int("BENCH_IMAGES", 100, smoke=2))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pics = images(args.n)
    rows = [("patch (default: student + clean teacher view)", train_views("patch", args.size)),
            ("none (clean view for both)", train_views("none", args.size)),
            ("randaugment (former default)", train_views("randaugment", args.size)),
            ("crop_flip", train_views("crop_flip", args.size)),
            ("eval (resize + centre crop)", eval_transform(args.size))]
    print(f"{args.size}x{args.size}, {args.n} images of 500x375, 1 thread, torch {torch.__version__}")
    for name, t in rows:
        print(f"  {name:46s} {rate(t, pics):7.1f} images/s")


if __name__ == "__main__":
    main()
