"""The toy accuracy benchmark: the demo's four methods over seeds, mean ± spread, and drop vs perturb.

    python bench/bench_accuracy.py [--seeds 1 2 3] [--epochs 5] [--shots 16] [--work DIR] [--out bench/results]

Writes ``accuracy.json`` (settings and every run's numbers), ``accuracy.csv`` (one row per method and seed)
and ``accuracy.md`` (the README table) into ``--out``. The setting is the demo's (drople_fast/training/demo.py,
docs/demo.md): one toy CLIP pre-trained once on web renders (seed 0), the downstream synthetic dataset
(seed 0), and per seed the few-shot sample, the learner's initialisation, the IWTD masks and the
augmentation. Spread is the sample standard deviation over seeds. This is offline evidence about the
method on a toy, not the paper's numbers: those need real CLIP weights and datasets.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from report_io import RESULTS, write_results  # noqa: E402

KEYS = ("base_acc", "novel_acc", "hm")
FIELDS = ["method", "seed", "base_acc", "novel_acc", "hm", "s_per_epoch", "epochs", "shots", "threads"]


def mean_spread(values):
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows, methods):
    """{method: {key: (mean, std)}} and the per-seed drop - perturb HM gap (mean, std, values)."""
    out = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        out[m] = {k: mean_spread([r[k] for r in mine]) for k in KEYS}
        times = [r["s_per_epoch"] for r in mine if r["s_per_epoch"] is not None]
        out[m]["s_per_epoch"] = mean_spread(times) if times else None
    return out


def hm_gap(rows, drop, perturb):
    by = {(r["method"], r["seed"]): r["hm"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    gaps = [by[(drop, s)] - by[(perturb, s)] for s in seeds if (drop, s) in by and (perturb, s) in by]
    return (*mean_spread(gaps), gaps) if gaps else None


def markdown(summary, gap, settings) -> str:
    pm = lambda ms: f"{ms[0]:.2f} ± {ms[1]:.2f}"  # noqa: E731
    lines = [f"Toy accuracy over seeds {settings['seeds']} (mean ± sample std): toy CLIP 224 px / patch 32 / "
             f"width 64, pre-trained {settings['pretrain_steps']} steps on web renders; synthetic downstream "
             f"dataset, {settings['num_classes'] // 2} base + {settings['num_classes'] // 2} novel classes, "
             f"{settings['shots']} shots, {settings['epochs']} epochs, batch 4, release defaults otherwise; "
             f"{settings['threads']} torch threads on {settings['machine']}.", "",
             "| Method | Base | Novel | HM | s per epoch |", "|---|---:|---:|---:|---:|"]
    for method, s in summary.items():
        t = "" if s["s_per_epoch"] is None else f"{s['s_per_epoch'][0]:.1f}"
        lines.append(f"| {method} | {pm(s['base_acc'])} | {pm(s['novel_acc'])} | {pm(s['hm'])} | {t} |")
    if gap is not None:
        lines += ["", f"HM of drop minus HM of perturb, per seed: {gap[0]:+.2f} ± {gap[1]:.2f} "
                      f"({', '.join(f'{g:+.2f}' for g in gap[2])})."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    import torch

    from drople_fast.training import demo

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=int, default=demo.DEFAULT_EPOCHS)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--pretrain-steps", type=int, default=demo.DEFAULT_PRETRAIN_STEPS)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--work", default=os.path.join("runs", "bench_accuracy"),
                   help="data, toy CLIP and runs (finished runs are reused)")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data_root, ckpt = demo.prepare(args.work, pretrain_steps=args.pretrain_steps, progress=False)
    rows = []
    for seed in args.seeds:
        results = []
        for label, mode, weights in demo.METHODS:
            print(f"seed {seed}: {label}", flush=True)
            run_dir = os.path.join(args.work, f"seed{seed}-{mode}-{'ce' if weights == demo.CE_ONLY else 'drople'}")
            results.append((label, demo.train_method(data_root, ckpt, run_dir, mode, weights, seed=seed,
                                                     shots=args.shots, epochs=args.epochs, progress=False)))
        for r in demo.table_rows(results):
            rows.append({**r, "seed": seed, "epochs": args.epochs, "shots": args.shots,
                         "threads": torch.get_num_threads()})
    methods = [demo.ZERO_SHOT] + [m[0] for m in demo.METHODS]
    summary = summarise(rows, methods)
    gap = hm_gap(rows, demo.METHODS[2][0], demo.METHODS[1][0])
    settings = {"seeds": args.seeds, "epochs": args.epochs, "shots": args.shots, "pretrain_steps": args.pretrain_steps,
                "num_classes": demo.DEFAULT_NUM_CLASSES, "threads": torch.get_num_threads(),
                "machine": f"{platform.machine()} ({os.cpu_count()} cores)", "torch": torch.__version__,
                "wall_s": time.perf_counter() - t0}
    text = markdown(summary, gap, settings)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "accuracy.json"), "w") as f:
        json.dump({"settings": settings, "rows": rows, "summary": summary,
                   "hm_gap_drop_minus_perturb": None if gap is None else
                   {"mean": gap[0], "std": gap[1], "per_seed": gap[2]}}, f, indent=1)
    write_results(args.out, "accuracy", text, rows, FIELDS)
    print(text)


if __name__ == "__main__":
    main()
