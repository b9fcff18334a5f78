"""What the report scripts share: their command line (a pytest-benchmark JSON in, an output folder) and
their outputs, ``<stem>.md`` (the README table) and ``<stem>.csv`` (keyed rows)."""
import argparse
import csv
import json
import os
import sys
from typing import Callable, Dict, List, Sequence, Tuple

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def read_benchmark_json(description: str, argv=None) -> Tuple[argparse.Namespace, Dict]:
    """Parse ``json [--out DIR]`` and load that pytest-benchmark JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    with open(args.json) as f:
        return args, json.load(f)


def write_results(out_dir: str, stem: str, markdown: str, rows: Sequence[Dict], fields: Sequence[str]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(out_dir, f"{stem}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def benchmark_rows(data: Dict, kind: str, fields: Sequence[str]) -> List[Dict]:
    """One row per benchmark of ``extra_info.kind == kind``: its ``fields`` from extra_info, plus the
    median / min time and the round count; ``_info`` keeps the whole extra_info for derived columns."""
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("kind") != kind:
            continue
        stats = b["stats"]
        row = {k: info.get(k) for k in fields if k in info}
        row.update(median_s=stats["median"], min_s=stats["min"], rounds=stats["rounds"], _info=info)
        rows.append(row)
    return rows


def add_speedups(rows: List[Dict], baseline: Tuple[str, str, str]) -> None:
    """``speedup`` of each row: the (mode, precision, teacher) ``baseline`` row's median over its own (nan
    without a baseline among ``rows``)."""
    base = next((r for r in rows if (r["mode"], r["precision"], r["teacher"]) == tuple(baseline)), None)
    for r in rows:
        r["speedup"] = base["median_s"] / r["median_s"] if base else float("nan")


def report_main(doc: str, stem: str, rows_from: Callable[[Dict], List[Dict]], markdown: Callable[[List[Dict]], str],
                fields: Sequence[str], argv=None) -> None:
    """A report script's main: JSON in, ``<stem>.md`` / ``<stem>.csv`` out (the Markdown also printed)."""
    args, data = read_benchmark_json(doc.splitlines()[0], argv)
    rows = rows_from(data)
    if not rows:
        sys.exit(f"{args.json}: no bench_{stem} results in it")
    text = markdown(rows)
    write_results(args.out, stem, text, rows, fields)
    print(text)


def machine_header(rows: List[Dict]) -> Tuple[str, str]:
    """The report header's machine phrase from the first row, "Device: cpu -- <name>, torch threads N[, CPU
    capability X] (<flags>)[, GEMM <bf16> GFLOP/s bf16 / <fp32> fp32]" (the parts bench/machine.py
    recorded), and the rows' load-average range "a-b"."""
    first = rows[0]
    capability = f", CPU capability {first['cpu_capability']}" if first.get("cpu_capability") else ""
    rates = first["_info"].get("gemm_gflops")
    gemm = f", GEMM {rates['bfloat16']:.0f} GFLOP/s bf16 / {rates['float32']:.0f} fp32" if rates else ""
    machine = (f"Device: {first['device']} -- {first['device_name']}, torch threads {first['threads']}{capability} "
               f"({first.get('cpu_flags', 'flags not recorded')}){gemm}")
    return machine, f"{min(r['loadavg'] for r in rows):.1f}-{max(r['loadavg'] for r in rows):.1f}"
