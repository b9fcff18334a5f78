"""Aggregation of run folders into tables and a plot."""
import csv
import json
import math
import os

import pytest

from drople_fast.training.report import (
    base_novel_table,
    find_runs,
    harmonic_mean,
    metric_table,
    plot_accuracy_vs_throughput,
    throughput_points,
    to_markdown,
    write_report,
)


def _run(root, name, **metrics):
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(metrics, f)


def _b2n(root, dataset, seed, base, novel, **extra):
    _run(root, f"b2n/{dataset}/seed{seed}", dataset=dataset, seed=seed, protocol="base2novel",
         base_acc=base, novel_acc=novel, hm=harmonic_mean(base, novel), **extra)


def test_harmonic_mean():
    assert harmonic_mean(84.26, 76.10) == pytest.approx(79.97, abs=0.005)  # PromptSRC's published average
    assert harmonic_mean(69.34, 74.22) == pytest.approx(71.70, abs=0.005)  # zero-shot CLIP
    assert harmonic_mean(50, 50) == 50
    assert harmonic_mean(0, 0) == 0
    with pytest.raises(ValueError):
        harmonic_mean(-1, 5)


def test_base_novel_table(tmp_path):
    root = str(tmp_path)
    for seed, (b, n) in enumerate([(80, 70), (82, 72), (84, 68)], 1):
        _b2n(root, "DTD", seed, b, n)
    for seed, (b, n) in enumerate([(98, 94), (99, 95)], 1):
        _b2n(root, "Caltech101", seed, b, n)
    _run(root, "other/x", dataset="DTD", seed=1, protocol="cross_dataset", acc=40.0)
    header, rows = base_novel_table(find_runs(root))
    assert header == ["Dataset", "Base", "Novel", "HM", "Seeds"]
    assert [r[0] for r in rows] == ["Caltech101", "DTD", "Average"]
    dtd = rows[1]
    assert dtd[1][0] == pytest.approx(82) and dtd[1][1] == pytest.approx(2.0)  # sample std of 80, 82, 84
    assert dtd[2][0] == pytest.approx(70) and dtd[2][1] == pytest.approx(2.0)
    assert dtd[3][0] == pytest.approx(harmonic_mean(82, 70))
    hms = [harmonic_mean(80, 70), harmonic_mean(82, 72), harmonic_mean(84, 68)]
    m = sum(hms) / 3
    assert dtd[3][1] == pytest.approx(math.sqrt(sum((h - m) ** 2 for h in hms) / 2))
    assert dtd[4] == 3
    avg = rows[2]
    assert avg[1][0] == pytest.approx((98.5 + 82) / 2) and avg[2][0] == pytest.approx((94.5 + 70) / 2)
    assert avg[3][0] == pytest.approx(harmonic_mean((98.5 + 82) / 2, (94.5 + 70) / 2))
    md = to_markdown(header, rows)
    assert "| DTD | 82.00 ± 2.00 | 70.00 ± 2.00 |" in md
    assert "| Average | 90.25 | 82.25 |" in md


def test_metric_table_generic_and_few_shot(tmp_path):
    root = str(tmp_path)
    for seed, acc in enumerate([60.0, 62.0], 1):
        _run(root, f"dg/v2/{seed}", dataset="ImageNetV2", seed=seed, protocol="dg", acc=acc)
    _run(root, "dg/sketch/1", dataset="ImageNetSketch", seed=1, protocol="dg", acc=48.0)
    for shots, acc in ((2, 50.0), (16, 70.0)):
        _run(root, f"fs/{shots}", dataset="DTD", seed=1, protocol="few_shot", shots=shots, acc=acc)
    runs = find_runs(root)
    header, rows = metric_table(runs, "dg")
    assert header == ["Dataset", "acc", "Seeds"]
    assert rows[0][0] == "ImageNetSketch" and rows[1][1] == (61.0, pytest.approx(math.sqrt(2)))
    assert rows[-1][0] == "Average" and rows[-1][1][0] == pytest.approx((48 + 61) / 2)
    header, rows = metric_table(runs, "few_shot")
    assert header == ["Dataset", "acc", "Seeds"]  # "shots" labels rows, it is not averaged
    assert [r[0] for r in rows[:2]] == ["DTD (2 shots)", "DTD (16 shots)"]


def test_bad_metrics_files(tmp_path):
    _run(str(tmp_path / "a"), "r", dataset="DTD", seed=1, protocol="base2novel", base_acc=80.0, novel_acc=70.0)
    with pytest.raises(ValueError, match=r"metrics.json: missing key\(s\) \['hm'\]"):
        find_runs(str(tmp_path / "a"))
    _run(str(tmp_path / "b"), "r", dataset="DTD", seed=1, protocol="base2novel", base_acc=80.0, novel_acc=70.0, hm=75.0)
    with pytest.raises(ValueError, match="disagrees"):
        find_runs(str(tmp_path / "b"))
    os.makedirs(tmp_path / "c" / "r")
    (tmp_path / "c" / "r" / "metrics.json").write_text("{broken")
    with pytest.raises(ValueError, match="metrics.json is not valid JSON"):
        find_runs(str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        find_runs(str(tmp_path / "missing_dir"))


def test_write_report_and_plot(tmp_path):
    runs_dir, out = str(tmp_path / "runs"), str(tmp_path / "out")
    _b2n(runs_dir, "DTD", 1, 80, 70, images_per_s=100.0, method="perturb")
    _b2n(runs_dir, "DTD", 2, 82, 72, images_per_s=110.0, method="perturb")
    _b2n(runs_dir, "DTD", 3, 81, 71, images_per_s=200.0, method="drop")
    _run(runs_dir, "xd/1", dataset="EuroSAT", seed=1, protocol="cross_dataset", acc=45.5)
    paths = write_report(runs_dir, out)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["accuracy_vs_throughput.png", "base2novel.csv", "base2novel.md", "cross_dataset.csv", "cross_dataset.md"]
    with open(os.path.join(out, "base2novel.csv")) as f:
        table = list(csv.reader(f))
    assert table[0] == ["Dataset", "Base_mean", "Base_std", "Novel_mean", "Novel_std", "HM_mean", "HM_std", "Seeds"]
    assert table[1][0] == "DTD" and float(table[1][1]) == pytest.approx(81.0) and table[1][-1] == "3"
    assert table[2][0] == "Average" and table[2][2] == ""
    png = open(os.path.join(out, "accuracy_vs_throughput.png"), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    pts = throughput_points(find_runs(runs_dir))
    assert [p[0] for p in pts] == ["drop", "perturb"]
    assert pts[1][1] == pytest.approx(105.0) and pts[1][2] == pytest.approx((harmonic_mean(80, 70) + harmonic_mean(82, 72)) / 2)
    with pytest.raises(ValueError, match="no .* points"):
        plot_accuracy_vs_throughput([], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="no metrics.json"):
        write_report(str(tmp_path / "out"), str(tmp_path / "out2"))


def test_cli(tmp_path, capsys):
    from drople_fast.training.cli import main

    _b2n(str(tmp_path / "r"), "DTD", 1, 80, 70)
    assert main(["report", str(tmp_path / "r"), str(tmp_path / "o")]) == 0
    assert "base2novel.md" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "o" / "base2novel.csv")
