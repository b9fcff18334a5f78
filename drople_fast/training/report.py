"""Aggregate run directories into Markdown/CSV tables and an accuracy-vs-throughput plot.

Each run directory holds ``metrics.json``; schema::

    {
      "dataset":  str,           # e.g. "DTD"
      "seed":     int,
      "protocol": str,           # "base2novel", "cross_dataset", "dg", "few_shot", "long_tail", ...
      "base_acc": float,         # percent; required for protocol "base2novel"
      "novel_acc": float,        # percent; required for protocol "base2novel"
      "hm":       float,         # harmonic_mean(base_acc, novel_acc); required for "base2novel"
      "zs_<metric>": float,      # optional: zero-shot CLIP's value of <metric> on the same splits
      "images_per_s": float,     # optional: training throughput
      "method":   str,           # optional, default "drople": e.g. "drople-drop", "drople-perturb"
      "shots", "precision": ...  # optional; also read from "info" (epochs, shots, model, precision,
      "info":     {...},         #   device) and from fingerprint.json beside metrics.json
      ...                        # any other numeric key (e.g. "acc") is a metric
    }

Grouping: one row per :data:`SETTING` -- (dataset, protocol, method, shots, epochs, model, precision),
everything that changes the numbers and that a reader compares -- so different methods, shot counts or
schedules are never averaged together. Within a row, runs of one seed are averaged first (a seed run
twice counts once, with a warning), then mean ± sample std (ddof=1; 0 for one seed) over seeds. Each
dataset gets a zero-shot CLIP row (from the runs' ``zs_*`` values). A warning is also given when the
runs of one row differ in any other fingerprinted setting (lr, LoRA rank, ...). In the base-to-novel
table the HM column is harmonic_mean of the mean Base and mean Novel (as the papers report it; its ±
is the std of per-seed HMs); an "Average" row per method and setting averages Base and Novel over
datasets (with HM of those two means) when there are two datasets or more.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .fileio import atomic_text, read_json
from .run_dir import flatten_fields

REQUIRED = ("dataset", "seed", "protocol")
# What makes two runs different experiments: one table row per distinct value of these.
SETTING = ("dataset", "protocol", "method", "shots", "epochs", "model", "precision")
# The setting columns a table shows only when they vary (the rest are said once above the table).
OPTIONAL_COLUMNS = ("shots", "epochs", "model", "precision")
# Keys that describe a run rather than measure it; never averaged as metrics.
NON_METRICS = REQUIRED + SETTING + ("images_per_s", "world_size")  # throughput goes to the plot
ZERO_SHOT = "zero-shot CLIP"
# Fingerprint fields that differ between seeds of one experiment by design.
_PER_SEED = frozenset({"seed", "data"})
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
    fingerprint = os.path.join(os.path.dirname(path), "fingerprint.json")
    if os.path.isfile(fingerprint):  # written by every training run; absent for hand-made metrics files
        saved = read_json(fingerprint, "run fingerprint")
        if isinstance(saved, dict):
            m["_fingerprint"] = flatten_fields(saved)
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


def run_info(run: Dict) -> Dict:
    info = run.get("info")
    return info if isinstance(info, dict) else {}


def run_setting(run: Dict) -> Tuple:
    """The run's values of :data:`SETTING` (None where the run does not record one): from
    ``metrics.json``, its ``info`` and the ``fingerprint.json`` beside it, in that order."""
    info, fp = run_info(run), run.get("_fingerprint", {})
    mode = info.get("mode", fp.get("config.iwtd.mode"))
    fp_precision = fp.get("config.precision")
    found = {"dataset": run["dataset"], "protocol": run["protocol"],
             "method": run.get("method") or (f"drople-{mode}" if mode else "drople"),
             "shots": run.get("shots", info.get("shots", fp.get("config.shots"))),
             "epochs": run.get("epochs", info.get("epochs", fp.get("config.epochs"))),
             "model": run.get("model", info.get("model", fp.get("config.model"))),
             # "auto" is not a precision: only the resolved one (recorded by the run) says what ran
             "precision": run.get("precision", info.get("precision", None if fp_precision == "auto" else fp_precision))}
    return tuple(found[k] for k in SETTING)


@dataclass
class Group:
    """The runs of one setting (or, for zero-shot rows, of one dataset, protocol and model)."""

    setting: Dict[str, Any]
    runs: List[Dict] = field(default_factory=list)

    @property
    def seeds(self) -> List:
        return sorted({r["seed"] for r in self.runs}, key=str)

    def per_seed(self, key: str) -> List[float]:
        """``key`` averaged within each seed (a seed run twice counts once), in seed order."""
        values: Dict[Any, List[float]] = defaultdict(list)
        for r in self.runs:
            if key in r:
                values[r["seed"]].append(r[key])
        return [sum(v) / len(v) for _, v in sorted(values.items(), key=lambda kv: str(kv[0]))]

    def stat(self, key: str) -> Optional[Tuple[float, float]]:
        values = self.per_seed(key)
        return mean_std(values) if values else None


def _sort_key(values: Sequence) -> Tuple:
    return tuple((v is None, v if isinstance(v, (int, float)) else str(v)) for v in values)


def group_runs(runs: Iterable[Dict], protocol: str) -> List[Group]:
    """The trained runs of ``protocol``, one :class:`Group` per :data:`SETTING`, sorted."""
    groups: Dict[Tuple, Group] = {}
    for r in runs:
        if r["protocol"] == protocol:
            key = run_setting(r)
            groups.setdefault(key, Group(dict(zip(SETTING, key)))).runs.append(r)
    return [groups[k] for k in sorted(groups, key=_sort_key)]


def zero_shot_groups(runs: Iterable[Dict], protocol: str) -> List[Group]:
    """Zero-shot CLIP's values, one group per (dataset, model): the runs' ``zs_<metric>`` as ``<metric>``.
    Zero-shot accuracy does not depend on the method, shots, epochs or seed's few-shot sample."""
    groups: Dict[Tuple, Group] = {}
    for r in runs:
        zs = {k[3:]: v for k, v in r.items() if k.startswith("zs_") and isinstance(v, (int, float))}
        if r["protocol"] != protocol or not zs:
            continue
        setting = dict(zip(SETTING, run_setting(r)))
        setting.update(method=ZERO_SHOT, shots=None, epochs=None, precision=None)
        key = tuple(setting[k] for k in SETTING)
        groups.setdefault(key, Group(setting)).runs.append({"seed": r["seed"], "_path": r["_path"], **zs})
    return [groups[k] for k in sorted(groups, key=_sort_key)]


def _describe(setting: Dict) -> str:
    return ", ".join(f"{k} {setting[k]}" for k in SETTING if setting.get(k) is not None)


def check_groups(groups: Iterable[Group]) -> List[str]:
    """One-line warnings: a seed run more than once in a row, and rows whose runs differ in a
    fingerprinted setting other than the seed (or ran on different devices)."""
    out = []
    for g in groups:
        seen: Dict[Any, List[str]] = defaultdict(list)
        for r in g.runs:
            seen[r["seed"]].append(os.path.dirname(r["_path"]))
        for seed, dirs in sorted(seen.items(), key=lambda kv: str(kv[0])):
            if len(dirs) > 1:
                out.append(f"{_describe(g.setting)}: seed {seed} appears in {len(dirs)} runs, averaged and "
                           f"counted once ({', '.join(dirs)})")
        fields: Dict[str, set] = defaultdict(set)
        for r in g.runs:
            for k, v in r.get("_fingerprint", {}).items():
                name = k[len("config."):] if k.startswith("config.") else k
                if name.split(".")[0] not in _PER_SEED and name not in SETTING:
                    fields[name].add(repr(v))
            fields["device"].add(repr(run_info(r).get("device")))
        mixed = {k: v for k, v in fields.items() if len(v) > 1 and k != "iwtd.mode"}
        if mixed:
            what = "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in sorted(mixed.items()))
            out.append(f"{_describe(g.setting)}: its {len(g.runs)} runs differ in {what}; "
                       f"averaging them mixes configurations")
    return out


@dataclass
class Table:
    """A report table: ``rows`` under ``header``; ``shared`` holds the setting values every row has
    (said once above the table instead of a column each); ``warnings`` the caveats of its numbers."""

    header: List[str]
    rows: List[List]
    shared: Dict[str, Any]
    warnings: List[str]


def varying_columns(groups: Sequence[Group]) -> Tuple[List[str], Dict[str, Any]]:
    """Setting columns that vary across the trained rows, and the values all of them share."""
    varying, shared = [], {}
    for k in OPTIONAL_COLUMNS:
        values = {g.setting[k] for g in groups}
        if len(values) > 1:
            varying.append(k)
        elif values and None not in values:
            shared[k] = values.pop()
    return varying, shared


def _rows(groups: Sequence[Group], zero_shot: Sequence[Group], varying: Sequence[str],
          cells: Callable[[Group], List]) -> List[List]:
    """Per dataset, its zero-shot row, then its trained rows; then "Average" rows over datasets."""
    rows = []
    datasets = sorted({g.setting["dataset"] for g in list(groups) + list(zero_shot)}, key=str)
    for dataset in datasets:
        for g in [z for z in zero_shot if z.setting["dataset"] == dataset] + \
                 [g for g in groups if g.setting["dataset"] == dataset]:
            rows.append([dataset, g.setting["method"], *[g.setting[k] for k in varying], *cells(g), len(g.seeds)])
    return rows


def _average_rows(rows: List[List], n_setting: int, combine: Callable[[List[List]], List]) -> List[List]:
    """One "Average" row per (method, varying settings) present for two datasets or more: the mean of
    the per-dataset means (no ± and no seed count: the datasets are not samples of one quantity)."""
    by_setting: Dict[Tuple, List[List]] = defaultdict(list)
    for row in rows:
        by_setting[tuple(row[1:n_setting])].append(row)
    return [["Average", *key, *combine(members), None]
            for key, members in by_setting.items() if len({m[0] for m in members}) > 1]


def _mean_cells(members: List[List], j: int) -> Optional[Tuple[float, None]]:
    values = [m[j][0] for m in members if m[j] is not None]
    return (sum(values) / len(values), None) if values else None


def base_novel_table(runs: Iterable[Dict]) -> Table:
    """Dataset, Method, varying settings, Base, Novel, HM, Seeds; each metric cell a (mean, std)."""
    runs = list(runs)
    groups, zero_shot = group_runs(runs, BASE2NOVEL), zero_shot_groups(runs, BASE2NOVEL)
    varying, shared = varying_columns(groups)

    def cells(g: Group) -> List:
        base, novel = g.stat("base_acc"), g.stat("novel_acc")
        if base is None or novel is None:
            return [base, novel, None]
        per_seed_hm = g.per_seed("hm") or [harmonic_mean(b, n) for b, n in zip(g.per_seed("base_acc"),
                                                                               g.per_seed("novel_acc"))]
        return [base, novel, (harmonic_mean(base[0], novel[0]), mean_std(per_seed_hm)[1])]

    rows = _rows(groups, zero_shot, varying, cells)
    n = 2 + len(varying)

    def combine(members: List[List]) -> List:
        base, novel = _mean_cells(members, n), _mean_cells(members, n + 1)
        return [base, novel, (harmonic_mean(base[0], novel[0]), None) if base and novel else None]

    rows += _average_rows(rows, n, combine)
    header = ["Dataset", "Method", *varying, "Base", "Novel", "HM", "Seeds"]
    return Table(header, rows, shared, check_groups(groups))


def _numeric_metrics(run: Dict) -> List[str]:
    return [
        k for k, v in run.items()
        if k not in NON_METRICS and not k.startswith(("_", "zs_")) and isinstance(v, (int, float))
        and not isinstance(v, bool)
    ]


def metric_table(runs: Iterable[Dict], protocol: str, metrics: Optional[Sequence[str]] = None) -> Table:
    """Dataset × metric table for one protocol (cross-dataset, DG, few-shot, ...) with zero-shot rows
    and "Average" rows. Without ``metrics``, every numeric key found in the runs is a column."""
    runs = list(runs)
    groups, zero_shot = group_runs(runs, protocol), zero_shot_groups(runs, protocol)
    if metrics is None:
        metrics = sorted({k for g in groups for r in g.runs for k in _numeric_metrics(r)})
    varying, shared = varying_columns(groups)
    rows = _rows(groups, zero_shot, varying, lambda g: [g.stat(k) for k in metrics])
    n = 2 + len(varying)
    rows += _average_rows(rows, n, lambda members: [_mean_cells(members, n + j) for j in range(len(metrics))])
    return Table(["Dataset", "Method", *varying, *metrics, "Seeds"], rows, shared, check_groups(groups))


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


def table_markdown(title: str, table: Table) -> str:
    """``## title``, the settings every row shares, the table, then its warnings."""
    out = f"## {title}\n\n"
    if table.shared:
        out += "Every row: " + ", ".join(f"{k} {v}" for k, v in table.shared.items()) + ".\n\n"
    out += to_markdown(table.header, table.rows)
    if table.warnings:
        out += "\n" + "".join(f"> warning: {w}\n" for w in table.warnings)
    return out


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


def to_csv(table: Table, path: str) -> None:
    """CSV with every setting as a column (shared ones too) and separate mean and std columns per
    metric (machine-readable); text cells are neutralised against formula injection (:func:`csv_safe`)."""
    labels = [h for h in table.header if h in ("Dataset", "Method", "Seeds") or h in OPTIONAL_COLUMNS]
    shared = [k for k in table.shared if k not in table.header]
    out_header = table.header[:2] + shared
    for h in table.header[2:]:
        out_header += [h] if h in labels else [f"{h}_mean", f"{h}_std"]
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow([csv_safe(h) for h in out_header])
    for row in table.rows:
        out = [csv_safe(row[0]), csv_safe(row[1])] + [csv_safe(str(table.shared[k])) for k in shared]
        for h, c in zip(table.header[2:], row[2:]):
            if h in labels:
                out.append("" if c is None else csv_safe(c if isinstance(c, (int, float)) else str(c)))
            elif c is None:
                out += ["", ""]
            else:
                out += [f"{c[0]:.4f}", "" if c[1] is None else f"{c[1]:.4f}"]
        w.writerow(out)
    atomic_text(path, f.getvalue())


def _stderr(message: str) -> None:
    print(f"report: warning: {message}", file=sys.stderr)


def write_report(run_root: str, out_dir: str, warn: Callable[[str], None] = _stderr) -> List[str]:
    """Write ``<protocol>.md`` / ``<protocol>.csv`` per protocol found, and
    ``accuracy_vs_throughput.png`` when runs report throughput; each table's warnings go to ``warn``
    (stderr by default) and under the table in its Markdown file. Returns the paths."""
    runs = find_runs(run_root)
    if not runs:
        raise ValueError(f"no metrics.json found under {run_root}")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for protocol in sorted({r["protocol"] for r in runs}):
        table = base_novel_table(runs) if protocol == BASE2NOVEL else metric_table(runs, protocol)
        for w in table.warnings:
            warn(w)
        md, csv_path = confined(out_dir, f"{protocol}.md"), confined(out_dir, f"{protocol}.csv")
        atomic_text(md, table_markdown(protocol, table))
        to_csv(table, csv_path)
        written += [md, csv_path]
    from .report_plot import plot_accuracy_vs_throughput, throughput_points, zero_shot_levels

    points = throughput_points(runs)
    if points:
        png = confined(out_dir, "accuracy_vs_throughput.png")
        plot_accuracy_vs_throughput(points, png, zero_shot=zero_shot_levels(runs))
        written.append(png)
    return written
