"""Turn the pytest-benchmark JSON of bench/bench_e2e.py into a Markdown table and CSV files.

    python bench/report_e2e.py bench/results/e2e.json [--out bench/results]

Per case: images (or prompts) per second from the median step time, peak
memory, the speedup against the unpatched step, the ideal token-ratio speedup
and the efficiency = measured speedup / ideal speedup.

Ideal cost: with L blocks and a token ratio r after layer l,
cost = (l + (L - l) r) / L. In general we use the measured mean number of real
tokens entering every block, cost = mean_l(tokens_l / tokens_full), which
reduces to that formula for a single drop (and accounts for compounding drops
in "drop" and for PatchDropout, which drops before block 0). The ideal ignores
the quadratic attention term, so a linear-cost model of a step.
"""
from __future__ import annotations

import sys

from report_io import read_benchmark_json, write_results


def _mib(value):
    return f"{value / 2**20:.0f}" if value else "-"


def rows_from(data: dict) -> list[dict]:
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "case" not in info:
            continue
        stats = b["stats"]
        # image: real tokens per sample (padding counts as waste); text: the width the tower runs on
        tokens = info["tokens_per_layer"] if info["kind"] == "image" else info["width_per_layer"]
        cost = sum(t / info["full_tokens"] for t in tokens) / len(tokens)
        rows.append(dict(
            kind=info["kind"], case=info["case"], precision=info.get("precision", "fp32"), batch=info["batch"], median_s=stats["median"], min_s=stats["min"],
            rounds=stats["rounds"], items_per_s=info["batch"] / stats["median"], cost=cost, ideal=1.0 / cost,
            saved_mib=(info.get("saved_bytes") or 0) / 2**20, cuda_peak_mib=(info.get("cuda_peak_bytes") or 0) / 2**20,
            rss_peak_mib=(info.get("rss_peak_bytes") or 0) / 2**20, device=info.get("device"),
            device_name=info.get("device_name"), threads=info.get("threads"), loadavg=info.get("loadavg"),
            mean_tokens=sum(tokens) / len(tokens), full_tokens=info["full_tokens"], layers=info["layers"],
        ))
    # speedups compare rows of one precision (a bf16 row against the bf16 unpatched step)
    for kind, precision in {(r["kind"], r["precision"]) for r in rows}:
        group = [r for r in rows if r["kind"] == kind and r["precision"] == precision]
        base = next((r for r in group if r["case"] == "unpatched"), None)
        # same-kernel baseline: patched cases against the patched tower with nothing dropped/trimmed
        same = next((r for r in group if r["case"] in ("off", "untrimmed")), base)
        for r in group:
            r["speedup"] = base["median_s"] / r["median_s"] if base else float("nan")
            r["efficiency"] = r["speedup"] / r["ideal"]
            ref = base if r["case"] in ("unpatched", "patchdropout") else same
            r["speedup_same"] = ref["median_s"] / r["median_s"] if ref else float("nan")
            r["efficiency_same"] = r["speedup_same"] / r["ideal"]
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = []
    first = rows[0] if rows else {}
    lines.append(f"Device: {first.get('device')} -- {first.get('device_name')}, torch threads {first.get('threads')}, "
                 f"load average at the end of each case {', '.join('%.1f' % r['loadavg'] for r in rows)}; "
                 f"{meta.get('machine_info', {}).get('cpu', {}).get('brand_raw', '')}".rstrip("; "))
    lines.append("")
    cuda = any(r["cuda_peak_mib"] for r in rows)
    mem_head = "CUDA peak MiB" if cuda else "saved-for-backward MiB | peak RSS MiB"
    for kind, title, unit in (("image", "ViT-B/16 image tower, training step (fwd + bwd, frozen backbone, 4 deep "
                                        "visual prompts x 6 layers + bridge)", "img/s"),
                              ("text", "ViT-B/16 text tower, eval forward of 100 class prompts", "prompts/s")):
        group = [r for r in rows if r["kind"] == kind]
        if not group:
            continue
        lines.append(f"**{title}**, batch {group[0]['batch']}, median of {group[0]['rounds']} rounds")
        lines.append("")
        lines.append(f"| case | precision | {unit} | step s (median / min) | mean tokens/block | {mem_head} | "
                     "speedup vs unpatched | ideal speedup | efficiency | speedup vs same kernels | efficiency (same kernels) |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if not cuda else ""))
        for r in group:
            mem = f"{r['cuda_peak_mib']:.0f}" if cuda else f"{r['saved_mib']:.0f} | {r['rss_peak_mib']:.0f}"
            lines.append(f"| {r['case']} | {r['precision']} | {r['items_per_s']:.2f} | {r['median_s']:.2f} / {r['min_s']:.2f} | "
                         f"{r['mean_tokens']:.1f} / {r['full_tokens']} | {mem} | {r['speedup']:.2f}x | "
                         f"{r['ideal']:.2f}x | {100 * r['efficiency']:.0f}% | {r['speedup_same']:.2f}x | "
                         f"{100 * r['efficiency_same']:.0f}% |")
        lines.append("")
    by = {(r["kind"], r["case"]): r for r in rows if r["precision"] == "fp32"}  # the goals are fp32 figures
    notes = []
    if ("image", "drop_fixed") in by and ("image", "patchdropout") in by:
        a, b = by[("image", "drop_fixed")], by[("image", "patchdropout")]
        notes.append(f"drop_fixed efficiency {100 * a['efficiency']:.0f}% vs unpatched, "
                     f"{100 * a['efficiency_same']:.0f}% vs off (goal >= 90%), PatchDropout "
                     f"{100 * b['efficiency']:.0f}% (goal: drop_fixed >= PatchDropout)")
    if ("image", "drop") in by and ("image", "perturb") in by:
        ratio = by[("image", "drop")]["items_per_s"] / by[("image", "perturb")]["items_per_s"]
        notes.append(f"drop / perturb images/s: {ratio:.2f}x (goal >= 3x)")
    if ("text", "eos_trim") in by and ("text", "untrimmed") in by:
        ratio = by[("text", "untrimmed")]["median_s"] / by[("text", "eos_trim")]["median_s"]
        notes.append(f"EOS trim / untrimmed: {ratio:.2f}x (goal >= 3x)")
    if notes:
        lines += ["Goals: " + "; ".join(notes) + "."]
    bf16 = [(r["case"], r["items_per_s"] / by[(r["kind"], r["case"])]["items_per_s"]) for r in rows
            if r["precision"] == "bf16" and (r["kind"], r["case"]) in by]
    if bf16:
        lines += ["", "bf16 / fp32 " + ", ".join(f"{case} {ratio:.2f}x" for case, ratio in bf16) + "."]
    lines += ["", "*Same kernels*: patched cases against `off` (text: `untrimmed`), open_clip cases against "
                  "`unpatched`, so the attention-kernel swap (SDPA vs nn.MultiheadAttention) does not count as "
                  "token savings. Ideal = 1 / mean_l(tokens_l / tokens_full); image: mean real tokens per sample, "
                  "text: the width the tower runs on."]
    if not cuda:
        lines += ["", "CPU memory: *saved-for-backward* = bytes of the distinct storages autograd saved during the step "
                      "(activation memory); *peak RSS* = process VmHWM over the step (model, caches and allocator "
                      "included: a coarse upper bound)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args, data = read_benchmark_json(__doc__.splitlines()[0], argv)
    rows = rows_from(data)
    if not rows:
        sys.exit(f"{args.json}: no bench_e2e results in it")
    text = markdown(rows, data)
    fields = ["kind", "case", "precision", "batch", "items_per_s", "median_s", "min_s", "rounds", "mean_tokens", "full_tokens",
              "layers", "cost", "ideal", "speedup", "efficiency", "saved_mib", "cuda_peak_mib", "rss_peak_mib",
              "device", "device_name", "threads", "loadavg"]
    write_results(args.out, "e2e", text, rows, fields)
    print(text)


if __name__ == "__main__":
    main()
