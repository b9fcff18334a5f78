"""What each of issue 19's changes is worth, in one process: the DroPLe step (drop / bf16 / teacher
cached, ViT-B/16 random weights, batch 4) with the text bridge features pooled for all classes or for
the batch's labels only, and attention from the measured table or torch's own SDPA choice.

    PYTHONPATH=. python bench/bench_step_ab.py [--classes 500] [--rounds 3]

The four variants take turns within each round (so a change of load hits them alike); the first round
is a warm-up; the table gives the fastest of the others (docs/step-speed.md has the numbers).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from drople_fast.clip import attention_dispatch as dispatch
from drople_fast.clip.config import IWTDConfig
from drople_fast.training.learner import DroPLe
from drople_fast.training.precision import autocast

from classnames import classnames
from smoke import env_int, vit_b16

CASES = [("labels", "table"), ("all", "table"), ("labels", "sdpa"), ("all", "sdpa")]
BASELINE = ("all", "sdpa")  # the former computation


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=env_int("BENCH_CLASSES", 500, smoke=4))
    p.add_argument("--rounds", type=int, default=env_int("BENCH_ROUNDS", 3, smoke=2))
    args = p.parse_args(argv)
    device = torch.device("cpu")
    torch.manual_seed(0)
    learner = DroPLe(vit_b16(device), classnames(args.classes), iwtd=IWTDConfig(mode="drop")).train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 224, 224, generator=g)
    labels = torch.randint(0, args.classes, (4,), generator=g)
    opt = torch.optim.AdamW([p for _, p in learner.trainable_named_parameters()], lr=1e-6)
    t0 = time.perf_counter()
    learner.teacher_text_features()
    print(f"teacher text features (set-up): {time.perf_counter() - t0:.1f} s", flush=True)
    cached = learner.teacher_image_features(images)
    measured = dispatch.table()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast("bf16", device):
            _, terms = learner(images, labels, epoch=1, total_epochs=20, teacher_features=cached)
        terms["total"].backward()
        opt.step()

    best = {c: float("inf") for c in CASES}
    try:
        for r in range(args.rounds):
            for rows, attention in CASES:
                learner.text_bridge_rows = rows
                dispatch.set_table(measured if attention == "table" else {})
                t0 = time.perf_counter()
                step()
                if r or args.rounds == 1:
                    best[(rows, attention)] = min(best[(rows, attention)], time.perf_counter() - t0)
    finally:
        dispatch.set_table(measured)
    print(f"{args.classes} classes, drop / bf16 / cached, fastest of {max(1, args.rounds - 1)}; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| text bridge rows | attention | step s | vs former |\n|---|---|---:|---:|")
    for c in CASES:
        label = "measured table" if c[1] == "table" else "torch's SDPA choice"
        print(f"| {c[0]} | {label} | {best[c]:.2f} | {best[BASELINE] / best[c]:.2f}x |")


if __name__ == "__main__":
    main()
