"""Measure every attention implementation on the towers' shapes and write the dispatch table.

    python bench/bench_attention_dispatch.py [--rounds 5] [--dry-run]
    python bench/bench_attention_dispatch.py --text-tower 500 [--rounds 3]   # the table's effect on a whole tower

For each problem (dtype x batch*heads x sequence length x causal / key-masked) every candidate
of :mod:`drople_fast.clip.attention_dispatch` runs forward + backward on q, k, v laid out as the
patched blocks make them (a permuted view of one packed (B, S, 3, H, Dh) projection); the
candidates take turns, round after round, and each keeps its fastest round (the least disturbed
on a shared machine). The fastest candidate is the entry's ``best``. The entries replace this
device's in ``drople_fast/clip/attention_table.py`` (other devices' entries are kept) and are
printed as a Markdown table.

Problems: the text tower (8 heads, causal) at 24, 100 and 500 prompts with the trimmed lengths of
short class names (10, 20) and the untrimmed context (77, not at 500); the vision tower (12 heads, batch 4 and
32) at 201 tokens (197 + 4 prompts) and, key-masked, at 100 (after a data-dependent drop).
"""
from __future__ import annotations

import argparse
import os
import pprint
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drople_fast.clip import attention_dispatch as dispatch  # noqa: E402
from drople_fast.training.precision import cpu_bf16_summary, cpu_model  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from machine import sync  # noqa: E402
from smoke import SMOKE, env_int  # noqa: E402

TABLE = ROOT / "drople_fast" / "clip" / "attention_table.py"
DH = 64
# (batch, heads, seq, causal, masked)
PROBLEMS = [(b, 8, s, True, False) for b in (24, 100, 500) for s in (10, 20, 77) if (b, s) != (500, 77)] + \
    [(b, 12, 201, False, False) for b in (4, 32)] + [(b, 12, 100, False, True) for b in (4, 32)]
DTYPES = (torch.float32, torch.bfloat16)


def _inputs(B, H, S, masked, dtype, device):
    g = torch.Generator().manual_seed(0)
    packed = torch.randn(B, S, 3 * H * DH, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    mask = None
    if masked:  # key padding after a drop: a valid prefix of 60-100 % of the row per sample
        lengths = torch.randint(int(0.6 * S), S + 1, (B,), generator=g)
        mask = (torch.arange(S)[None, :] < lengths[:, None])[:, None, None, :].to(device)
    return packed, mask


def measure(B, H, S, causal, masked, dtype, device, rounds):
    packed, mask = _inputs(B, H, S, masked, dtype, device)
    names = [n for n in dispatch.IMPLEMENTATIONS if not (n == "sdpa_fp32" and dtype == torch.float32)]
    best = {n: float("inf") for n in names}
    for _ in range(rounds + 1):  # the first round warms up and is not counted
        for name in names:
            fn = dispatch.IMPLEMENTATIONS[name]
            sync(device)
            start = time.perf_counter()
            q, k, v = packed.view(B, S, 3, H, DH).permute(2, 0, 3, 1, 4).unbind(0)
            out = fn(q, k, v, mask, causal)
            out.transpose(1, 2).reshape(B, S, H * DH).sum().backward()
            sync(device)
            elapsed = time.perf_counter() - start
            packed.grad = None
            if _ > 0:
                best[name] = min(best[name], elapsed)
    ms = {n: round(t * 1e3, 3) for n, t in best.items()}
    return dict(dtype=str(dtype).removeprefix("torch."), batch_heads=B * H, seq=S, causal=causal, masked=masked,
                batch=B, heads=H, ms=ms, best=min(ms, key=ms.get))


def write_table(key: str, entries: list, meta: dict) -> None:
    devices = dict(dispatch.table()) if TABLE.exists() else {}
    devices[key] = entries
    meta_all = {}
    try:
        from drople_fast.clip.attention_table import MEASURED
        meta_all.update(MEASURED)
    except ImportError:
        pass
    meta_all[key] = meta
    TABLE.write_text(
        '"""Measured attention dispatch table (written by bench/bench_attention_dispatch.py; do not edit by hand).\n\n'
        "DEVICES: per device key, one entry per measured problem: fastest forward + backward round (ms) of\n"
        'each candidate and the fastest one (``best``). MEASURED: where and how each device\'s entries were taken.\n"""\n\n'
        "DEVICES = {\n" + "".join(f"    {key!r}: [\n" + "".join(f"        {e!r},\n" for e in entries) + "    ],\n"
                                 for key, entries in devices.items()) + "}\n\n"
        f"MEASURED = {pprint.pformat(meta_all, width=110, sort_dicts=False)}\n")


def markdown(key, entries, meta) -> str:
    names = list(dispatch.IMPLEMENTATIONS)
    lines = [f"Device {key} ({meta['cpu']}), torch {meta['torch']}, {meta['threads']} threads, fastest of "
             f"{meta['rounds']} rounds, load average {meta['loadavg']}", "",
             "| dtype | batch x heads | seq | causal | key mask | " + " | ".join(f"{n} ms" for n in names) +
             " | best | best vs sdpa |", "|---|---:|---:|---|---|" + "---:|" * len(names) + "---|---:|"]
    for e in entries:
        cells = " | ".join(f"{e['ms'][n]:.1f}" if n in e["ms"] else "-" for n in names)
        lines.append(f"| {e['dtype']} | {e['batch']} x {e['heads']} | {e['seq']} | {e['causal']} | {e['masked']} | "
                     f"{cells} | {e['best']} | {e['ms']['sdpa'] / e['ms'][e['best']]:.2f}x |")
    return "\n".join(lines) + "\n"


def text_tower(classes: int, rounds: int, device) -> str:
    """The DroPLe text tower (ViT-B/16, prompts over ``classes`` ImageNet names, training mode) forward +
    backward in fp32 and bf16 autocast, with the committed table and with torch's own SDPA choice
    (an empty table), the four taking turns; fastest round of each. Markdown."""
    import open_clip

    sys.path.insert(0, str(ROOT / "bench"))
    from classnames import classnames
    from drople_fast.clip.config import IWTDConfig
    from drople_fast.training.learner import DroPLe
    from drople_fast.training.precision import autocast

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None).to(device)
    learner = DroPLe(clip, classnames(classes), iwtd=IWTDConfig(mode="drop")).to(device).train()
    committed = dispatch.table()

    def run(precision):
        with autocast(precision, device):
            out = learner.text_features()
        out.sum().backward()
        learner.zero_grad(set_to_none=True)

    cases = [(p, t) for p in ("fp32", "bf16") for t in ("table", "sdpa")]
    best = {c: float("inf") for c in cases}
    for r in range(rounds + 1):
        for precision, table in cases:
            dispatch.set_table(committed if table == "table" else {})
            sync(device)
            start = time.perf_counter()
            run(precision)
            sync(device)
            if r:
                best[(precision, table)] = min(best[(precision, table)], time.perf_counter() - start)
    dispatch.set_table(None)
    f32 = best[("fp32", "sdpa")]
    lines = [f"Text tower fwd + bwd, {classes} classes, {dispatch.device_key(device)} ({_cpu_name()}), "
             f"{torch.get_num_threads()} threads, fastest of {rounds} rounds, load average {os.getloadavg()[0]:.1f}", "",
             "| precision | attention | s | vs fp32 torch's choice |", "|---|---|---:|---:|"]
    for precision, table in cases:
        t = best[(precision, table)]
        name = "measured table" if table == "table" else "torch's SDPA choice"
        lines.append(f"| {precision} | {name} | {t:.2f} | {t / f32:.2f}x |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    return f"{cpu_model()}, {cpu_bf16_summary()}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=env_int("BENCH_ROUNDS", 5, smoke=1))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry-run", action="store_true", help="print the table, do not write it")
    parser.add_argument("--text-tower", type=int, metavar="CLASSES",
                        help="instead: time the whole text tower with and without the committed table")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.text_tower:
        print(text_tower(args.text_tower, args.rounds, device))
        return
    key = dispatch.device_key(device)
    entries = []
    # BENCH_SMOKE=1: two small problems, and the committed table is never rewritten from such a run
    problems = [(4, 8, 10, True, False), (2, 12, 20, False, True)] if SMOKE else PROBLEMS
    for dtype in DTYPES:
        for B, H, S, causal, masked in problems:
            entries.append(measure(B, H, S, causal, masked, dtype, device, args.rounds))
            print(entries[-1], flush=True)
    meta = dict(cpu=_cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
                torch=torch.__version__, threads=torch.get_num_threads(), rounds=args.rounds,
                loadavg=round(os.getloadavg()[0], 1), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(markdown(key, entries, meta))
    if not (args.dry_run or SMOKE):
        write_table(key, entries, meta)
        print(f"wrote {len(entries)} entries for {key} to {TABLE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
