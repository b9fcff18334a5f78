"""Aggregate run directories into Markdown/CSV tables and a throughput plot.

Each run directory holds ``metrics.json``; schema::

    {
      "dataset":  str,           # e.g. "DTD"
      "seed":     int,
      "protocol": str,           # "base2novel", "cross_dataset", "dg", "few_shot", "long_tail", ...
      "base_acc": float,         # percent; required for protocol "base2novel"
      "novel_acc": float,        # percent; required for protocol "base2novel"
      "hm":       float,         # harmonic_mean(base_acc, novel_acc); required for "base2novel"
      "images_per_s": float,     # optional: training throughput
      "method":   str,           # optional, default "drople": groups points in the plot
      ...                        # any other numeric key (e.g. "acc", "shots") is a metric
    }

Aggregation: per dataset, mean ± sample std (ddof=1; 0 for one seed) over
seeds. In the base-to-novel table the HM column is harmonic_mean of the mean
Base and mean Novel (as the papers report it; its ± is the std of per-seed
HMs), and the "Average" row is the mean of the per-dataset Base and Novel with
HM of those two means.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .fileio import atomic_text, read_json

REQUIRED = ("dataset", "seed", "protocol")
# Keys that describe a run rather than measure it; never averaged as metrics.
NON_METRICS = REQUIRED + ("shots", "images_per_s")  # throughput goes to the plot, not the accuracy tables
BASE2NOVEL = "base2novel"
B2N_KEYS = ("base_acc", "novel_acc", "hm")
# A protocol name becomes a file name in the report folder: a plain word, nothing that can leave it.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Spreadsheets execute cells that start with these (CSV formula injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def harmonic_mean(base: float, novel: float) -> float:
    """2·b·n / (b + n); 0 when both are 0."""
    if base < 0 or novel < 0:
        raise ValueError(f"accuracies must be >= 0, got base={base}, novel={novel}")
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


def read_metrics(path: str) -> Dict:
    """Read and validate one ``metrics.json``."""
    m = read_json(path, "metrics file")
    if not isinstance(m, dict):
        raise ValueError(f"{path}: expected a JSON object")
    keys = REQUIRED + (B2N_KEYS if m.get("protocol") == BASE2NOVEL else ())
    missing = [k for k in keys if k not in m]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    if not isinstance(m["protocol"], str) or not _SAFE_NAME.match(m["protocol"]) or ".." in m["protocol"]:
        raise ValueError(f"{path}: protocol must be a plain name (letters, digits, _ . -), got {m['protocol']!r}")
    for k, v in m.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{path}: {k} is {v}; a finished run never reports a non-finite number")
    if m["protocol"] == BASE2NOVEL:
        for k in B2N_KEYS:
            if not isinstance(m[k], (int, float)) or isinstance(m[k], bool):
                raise ValueError(f"{path}: {k} must be a number, got {m[k]!r}")
        expected = harmonic_mean(m["base_acc"], m["novel_acc"])
        if abs(expected - m["hm"]) > 0.05:
            raise ValueError(f"{path}: hm {m['hm']} disagrees with harmonic_mean(base, novel) = {expected:.3f}")
    m["_path"] = path
    return m


def find_runs(root: str) -> List[Dict]:
    """Every ``metrics.json`` under ``root`` (recursively), sorted by path."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"run folder not found: {root}")
    paths = sorted(
        os.path.join(d, "metrics.json") for d, _, files in os.walk(root) if "metrics.json" in files
    )
    return [read_metrics(p) for p in paths]


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _numeric_metrics(run: Dict) -> List[str]:
    return [
        k for k, v in run.items()
        if k not in NON_METRICS and not k.startswith("_") and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]


def _row_name(run: Dict) -> str:
    """Seeds of one setting share a row; few-shot runs differ by "shots" too."""
    return f"{run['dataset']} ({run['shots']} shots)" if "shots" in run else str(run["dataset"])


def _group(runs: Iterable[Dict], protocol: str) -> Dict[str, List[Dict]]:
    groups: Dict[str, List[Dict]] = defaultdict(list)
    for r in runs:
        if r["protocol"] == protocol:
            groups[_row_name(r)].append(r)
    # dataset order, then numeric shots (so 2 shots sorts before 16)
    order = sorted(groups, key=lambda k: (str(groups[k][0]["dataset"]), groups[k][0].get("shots", 0)))
    return {k: groups[k] for k in order}


def base_novel_table(runs: Iterable[Dict]) -> Tuple[List[str], List[List]]:
    """Header and rows (dataset, Base, Novel, HM, seeds); each cell a (mean, std)."""
    header = ["Dataset", "Base", "Novel", "HM", "Seeds"]
    rows = []
    for dataset, group in _group(runs, BASE2NOVEL).items():
        base = mean_std([r["base_acc"] for r in group])
        novel = mean_std([r["novel_acc"] for r in group])
        hm = (harmonic_mean(base[0], novel[0]), mean_std([r["hm"] for r in group])[1])
        rows.append([dataset, base, novel, hm, len(group)])
    if rows:
        avg_base = sum(r[1][0] for r in rows) / len(rows)
        avg_novel = sum(r[2][0] for r in rows) / len(rows)
        rows.append(["Average", (avg_base, None), (avg_novel, None), (harmonic_mean(avg_base, avg_novel), None), None])
    return header, rows


def metric_table(runs: Iterable[Dict], protocol: str, metrics: Optional[Sequence[str]] = None) -> Tuple[List[str], List[List]]:
    """Generic dataset × metric table for one protocol (cross-dataset, DG,
    few-shot, ...), with an "Average" row of the per-dataset means. Without
    ``metrics``, every numeric key found in the runs is a column."""
    groups = _group(runs, protocol)
    if metrics is None:
        metrics = sorted({k for g in groups.values() for r in g for k in _numeric_metrics(r)})
    header = ["Dataset", *metrics, "Seeds"]
    rows = []
    for dataset, group in groups.items():
        cells = []
        for k in metrics:
            vals = [r[k] for r in group if k in r]
            cells.append(mean_std(vals) if vals else None)
        rows.append([dataset, *cells, len(group)])
    if rows:
        avg = []
        for j in range(1, len(metrics) + 1):
            vals = [row[j][0] for row in rows if row[j] is not None]
            avg.append((sum(vals) / len(vals), None) if vals else None)
        rows.append(["Average", *avg, None])
    return header, rows


def _cell(c, digits: int = 2) -> str:
    if c is None:
        return ""
    if isinstance(c, tuple):
        mean, std = c
        return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"
    return str(c)


def to_markdown(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_safe(cell):
    """A text cell a spreadsheet will not execute: leading = + - @ (and tab/CR) get a quote prefix."""
    if isinstance(cell, str) and cell.startswith(_FORMULA_START):
        return "'" + cell
    return cell


def confined(out_dir: str, name: str) -> str:
    """``out_dir/name``, refusing a name that is not a plain file name inside ``out_dir``."""
    path = os.path.normpath(os.path.join(os.path.abspath(out_dir), name))
    if os.path.dirname(path) != os.path.normpath(os.path.abspath(out_dir)):
        raise ValueError(f"report file name {name!r} would leave the output folder {out_dir}")
    return path


def to_csv(header: Sequence[str], rows: Sequence[Sequence], path: str) -> None:
    """CSV with separate mean and std columns per metric (machine-readable); text cells are
    neutralised against formula injection (:func:`csv_safe`)."""
    out_header = [header[0]]
    for h in header[1:]:
        out_header += [h] if h == "Seeds" else [f"{h}_mean", f"{h}_std"]
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow([csv_safe(h) for h in out_header])
    for row in rows:
        out = [csv_safe(row[0])]
        for h, c in zip(header[1:], row[1:]):
            if h == "Seeds":
                out.append("" if c is None else c)
            elif c is None:
                out += ["", ""]
            else:
                out += [f"{c[0]:.4f}", "" if c[1] is None else f"{c[1]:.4f}"]
        w.writerow(out)
    atomic_text(path, f.getvalue())


def throughput_points(runs: Iterable[Dict], metric: str = "hm") -> List[Tuple[str, float, float]]:
    """(method, mean images/s, mean ``metric``) over runs that report both."""
    groups: Dict[str, List[Dict]] = defaultdict(list)
    for r in runs:
        if "images_per_s" in r and metric in r:
            groups[r.get("method", "drople")].append(r)
    return [
        (m, mean_std([r["images_per_s"] for r in g])[0], mean_std([r[metric] for r in g])[0])
        for m, g in sorted(groups.items())
    ]


def plot_accuracy_vs_throughput(points: Sequence[Tuple[str, float, float]], path: str, ylabel: str = "HM (%)") -> None:
    """Scatter of accuracy against training throughput, one labelled point per method."""
    if not points:
        raise ValueError("no (method, images_per_s, accuracy) points to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for label, x, y in points:
        ax.scatter([x], [y])
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("training throughput (images/s)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_root: str, out_dir: str) -> List[str]:
    """Write ``<protocol>.md`` / ``<protocol>.csv`` per protocol found, and
    ``accuracy_vs_throughput.png`` when runs report throughput. Returns the paths."""
    runs = find_runs(run_root)
    if not runs:
        raise ValueError(f"no metrics.json found under {run_root}")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for protocol in sorted({r["protocol"] for r in runs}):
        if protocol == BASE2NOVEL:
            header, rows = base_novel_table(runs)
        else:
            header, rows = metric_table(runs, protocol)
        md, csv_path = confined(out_dir, f"{protocol}.md"), confined(out_dir, f"{protocol}.csv")
        atomic_text(md, f"## {protocol}\n\n" + to_markdown(header, rows))
        to_csv(header, rows, csv_path)
        written += [md, csv_path]
    points = throughput_points(runs)
    if points:
        png = confined(out_dir, "accuracy_vs_throughput.png")
        plot_accuracy_vs_throughput(points, png)
        written.append(png)
    return written


