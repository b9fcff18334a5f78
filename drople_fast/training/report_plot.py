"""The report's plot: accuracy against training throughput, a point per row of the report's tables
(:mod:`.report` groups the runs; this module only draws them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .report import (BASE2NOVEL, ZERO_SHOT, Group, group_runs, harmonic_mean, run_info, varying_columns,
                     zero_shot_groups)


@dataclass
class Point:
    """One setting's place in the accuracy-vs-throughput plot: means and stds over its seeds."""

    label: str
    dataset: str
    images_per_s: Tuple[float, float]
    accuracy: Tuple[float, float]
    devices: Tuple[str, ...]


def throughput_points(runs: Iterable[Dict], metric: str = "hm") -> List[Point]:
    """A :class:`Point` per trained setting whose runs report both throughput and ``metric``."""
    runs = [r for r in runs if "images_per_s" in r and metric in r]
    points = []
    for protocol in sorted({r["protocol"] for r in runs}):
        groups = group_runs(runs, protocol)
        varying, _ = varying_columns(groups)
        for g in groups:
            label = " ".join([g.setting["method"], *[f"{k}={g.setting[k]}" for k in varying]])
            devices = tuple(sorted({str(run_info(r).get("device") or "device not recorded") for r in g.runs}))
            points.append(Point(label, str(g.setting["dataset"]), g.stat("images_per_s"), _accuracy(g, metric),
                                devices))
    return points


def _accuracy(g: Group, metric: str) -> Tuple[float, float]:
    """``metric``'s mean ± std over seeds; HM as the tables give it (HM of the mean Base and Novel)."""
    mean, std = g.stat(metric)
    if metric == "hm" and g.per_seed("base_acc") and g.per_seed("novel_acc"):
        mean = harmonic_mean(g.stat("base_acc")[0], g.stat("novel_acc")[0])
    return mean, std


def zero_shot_levels(runs: Iterable[Dict], metric: str = "hm") -> Dict[str, float]:
    """Zero-shot CLIP's ``metric`` per dataset (base-to-novel runs), drawn as a line in the plot."""
    return {str(g.setting["dataset"]): _accuracy(g, metric)[0] for g in zero_shot_groups(runs, BASE2NOVEL)
            if g.per_seed(metric)}


def accuracy_figure(points: Sequence[Point], ylabel: str = "HM (%)", zero_shot: Optional[Dict[str, float]] = None):
    """Accuracy against training throughput, one panel per dataset, one marker per setting with
    error bars over seeds (± std), labelled in a legend (annotations overlap), zero-shot CLIP as a
    dashed line where known; each panel titled with its dataset and the device(s) its runs trained
    on. Returns the matplotlib figure (Agg)."""
    if not points:
        raise ValueError("no (setting, images_per_s, accuracy) points to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({p.dataset for p in points})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        mine = [p for p in points if p.dataset == dataset]
        for i, p in enumerate(mine):
            ax.errorbar([p.images_per_s[0]], [p.accuracy[0]], xerr=[p.images_per_s[1]], yerr=[p.accuracy[1]],
                        fmt="os^Dv<>p"[i % 8], capsize=3, label=p.label)
        if zero_shot and dataset in zero_shot:
            ax.axhline(zero_shot[dataset], color="grey", linestyle="--", linewidth=1, label=ZERO_SHOT)
        devices = sorted({d for p in mine for d in p.devices})
        ax.set_title(f"{dataset} on {', '.join(devices)}", fontsize=10)
        ax.set_xlabel("training throughput (images/s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.suptitle("accuracy vs training throughput (error bars: ± std over seeds)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_accuracy_vs_throughput(points: Sequence[Point], path: str, ylabel: str = "HM (%)",
                                zero_shot: Optional[Dict[str, float]] = None) -> None:
    """:func:`accuracy_figure` written to ``path`` as PNG."""
    fig = accuracy_figure(points, ylabel, zero_shot)
    import matplotlib.pyplot as plt  # after accuracy_figure chose the Agg backend

    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
