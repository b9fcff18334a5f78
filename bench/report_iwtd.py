"""Summarise a pytest-benchmark JSON of bench/bench_iwtd.py as a Markdown table (+ CSV).

    python bench/report_iwtd.py bench/results/iwtd.json [--baseline NAME] [--csv PATH]

Columns: median and IQR (ms), ratio of the median to the baseline's median (default: the eager
reference on CPU), peak memory (MiB, see bench/conftest.py for how it is measured) and, for IWTD
rows, the median as a percentage of the open_clip block on the same device.
The CSV goes to bench/results/<json stem>.csv unless --csv is given.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

DEFAULT_BASELINE = "test_iwtd_reference_eager[cpu]"
RESULTS = Path(__file__).resolve().parent / "results"


def load_rows(path: Path) -> tuple[list[dict], dict]:
    data = json.loads(path.read_text())
    rows = []
    for bench in data.get("benchmarks", []):
        stats, extra = bench["stats"], bench.get("extra_info", {})
        rows.append(dict(
            name=bench["name"], label=extra.get("label", bench["name"]), device=extra.get("device", "?"),
            median_ms=stats["median"] * 1e3, iqr_ms=stats["iqr"] * 1e3, min_ms=stats["min"] * 1e3,
            rounds=stats["rounds"], peak_mib=extra.get("peak_bytes", float("nan")) / 2**20,
            largest_alloc_mib=extra.get("largest_alloc_bytes", float("nan")) / 2**20,
            threads=extra.get("threads", ""),
        ))
    return rows, data.get("machine_info", {})


def add_ratios(rows: list[dict], baseline: str) -> None:
    base = next((r for r in rows if r["name"] == baseline), None)
    blocks = {r["device"]: r for r in rows if r["name"].startswith("test_open_clip_block")}
    for r in rows:
        r["ratio_vs_baseline"] = r["median_ms"] / base["median_ms"] if base else float("nan")
        block = blocks.get(r["device"])
        is_block = r["name"].startswith("test_open_clip_block")
        r["pct_of_block"] = (100.0 * r["median_ms"] / block["median_ms"]) if block and not is_block else float("nan")


def fmt(x: float, digits: int = 2) -> str:
    return "—" if x != x else f"{x:.{digits}f}"  # NaN -> dash


def markdown(rows: list[dict], baseline: str) -> str:
    head = ("| benchmark | device | median (ms) | IQR (ms) | rounds | × eager ref | % of block | "
            "peak (MiB) | largest alloc (MiB) |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['device']} | {fmt(r['median_ms'], 1)} | {fmt(r['iqr_ms'], 1)} | "
                     f"{r['rounds']} | {fmt(r['ratio_vs_baseline'])} | {fmt(r['pct_of_block'], 1)} | "
                     f"{fmt(r['peak_mib'], 1)} | {fmt(r['largest_alloc_mib'], 1)} |")
    lines.append("")
    lines.append(f"Ratios are medians over `{baseline}`; '% of block' is the IWTD median over the open_clip "
                 "ResidualAttentionBlock median on the same device.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    rows, machine = load_rows(args.json)
    if not rows:
        print(f"no benchmarks in {args.json}", file=sys.stderr)
        return 1
    add_ratios(rows, args.baseline)
    if machine:
        print(f"machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
              f"python {machine.get('python_version', '?')}\n")
    print(markdown(rows, args.baseline))
    out = args.csv or RESULTS / f"{args.json.stem}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["name", "label", "device", "median_ms", "iqr_ms", "min_ms", "rounds", "ratio_vs_baseline",
              "pct_of_block", "peak_mib", "largest_alloc_mib", "threads"]
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r[k] for k in fields})
    print(f"\nCSV written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
