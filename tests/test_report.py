"""Aggregation of run folders into tables and a plot."""
import csv
import json
import math
import os

import pytest

from drople_fast.training.report import base_novel_table, find_runs, harmonic_mean, metric_table, to_markdown, write_report
from drople_fast.training.report_plot import (accuracy_figure, plot_accuracy_vs_throughput, throughput_points,
                                              zero_shot_levels)


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
    table = base_novel_table(find_runs(root))
    assert table.header == ["Dataset", "Method", "Base", "Novel", "HM", "Seeds"]
    assert [r[:2] for r in table.rows] == [["Caltech101", "drople"], ["DTD", "drople"], ["Average", "drople"]]
    dtd = table.rows[1]
    assert dtd[2][0] == pytest.approx(82) and dtd[2][1] == pytest.approx(2.0)  # sample std of 80, 82, 84
    assert dtd[3][0] == pytest.approx(70) and dtd[3][1] == pytest.approx(2.0)
    assert dtd[4][0] == pytest.approx(harmonic_mean(82, 70))
    hms = [harmonic_mean(80, 70), harmonic_mean(82, 72), harmonic_mean(84, 68)]
    m = sum(hms) / 3
    assert dtd[4][1] == pytest.approx(math.sqrt(sum((h - m) ** 2 for h in hms) / 2))
    assert dtd[5] == 3
    avg = table.rows[2]
    assert avg[2][0] == pytest.approx((98.5 + 82) / 2) and avg[3][0] == pytest.approx((94.5 + 70) / 2)
    assert avg[4][0] == pytest.approx(harmonic_mean((98.5 + 82) / 2, (94.5 + 70) / 2))
    md = to_markdown(table.header, table.rows)
    assert "| DTD | drople | 82.00 ± 2.00 | 70.00 ± 2.00 |" in md
    assert "| Average | drople | 90.25 | 82.25 |" in md
    assert table.warnings == []


def _trained(root, name, dataset="DTD", seed=1, base=80.0, novel=70.0, mode="drop", epochs=5, shots=16,
             model="tiny", precision="fp32", zs=(70.0, 72.0), fingerprint=None, **extra):
    """A run folder as ``drople-fast train`` writes it: metrics.json with info and zero-shot values."""
    info = dict(epochs=epochs, shots=shots, mode=mode, model=model, precision=precision, device="CPU X (2 cores)")
    zs_metrics = dict(zs_base_acc=zs[0], zs_novel_acc=zs[1], zs_hm=harmonic_mean(*zs))
    _b2n(root, dataset, seed, base, novel, method=f"drople-{mode}", info=info, **zs_metrics, **extra)
    folder = os.path.join(root, f"b2n/{dataset}/seed{seed}")
    os.rename(folder, os.path.join(root, name))
    if fingerprint is not None:
        with open(os.path.join(root, name, "fingerprint.json"), "w") as f:
            json.dump(fingerprint, f)


def test_methods_are_rows_of_their_own_beside_zero_shot(tmp_path):
    root = str(tmp_path)
    for i, (mode, base) in enumerate([("drop", 80.0), ("off", 70.0), ("perturb", 75.0)]):
        for seed in (1, 2):
            _trained(root, f"{mode}{seed}", seed=seed, base=base + seed, mode=mode)
    table = base_novel_table(find_runs(root))
    assert table.header == ["Dataset", "Method", "Base", "Novel", "HM", "Seeds"]
    assert [r[1] for r in table.rows] == ["zero-shot CLIP", "drople-drop", "drople-off", "drople-perturb"]
    zs, drop, off = table.rows[0], table.rows[1], table.rows[2]
    assert zs[2] == (70.0, 0.0) and zs[3] == (72.0, 0.0) and zs[5] == 2
    assert drop[2][0] == pytest.approx(81.5) and off[2][0] == pytest.approx(71.5)  # never averaged together
    assert table.shared == {"shots": 16, "epochs": 5, "model": "tiny", "precision": "fp32"}
    out = tmp_path / "out"
    write_report(root, str(out), warn=pytest.fail)  # nothing to warn about
    md = (out / "base2novel.md").read_text()
    assert "Every row: shots 16, epochs 5, model tiny, precision fp32." in md
    assert "| DTD | zero-shot CLIP | 70.00 ± 0.00 | 72.00 ± 0.00 |" in md
    with open(out / "base2novel.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["Method"], r["epochs"], r["precision"]) for r in rows][1] == ("drople-drop", "5", "fp32")


def test_settings_that_differ_become_columns(tmp_path):
    root = str(tmp_path)
    _trained(root, "e2s1", epochs=2, base=60.0)
    _trained(root, "e3s1", epochs=3, base=66.0)
    _trained(root, "bf16", epochs=3, base=64.0, precision="bf16")
    table = base_novel_table(find_runs(root))
    assert table.header == ["Dataset", "Method", "epochs", "precision", "Base", "Novel", "HM", "Seeds"]
    trained = [(r[2], r[3], r[4][0], r[-1]) for r in table.rows if r[1] != "zero-shot CLIP"]
    assert trained == [(2, "fp32", 60.0, 1), (3, "bf16", 64.0, 1), (3, "fp32", 66.0, 1)]


def test_duplicated_seed_counts_once_and_warns(tmp_path):
    root = str(tmp_path)
    _trained(root, "a", seed=1, base=80.0)
    _trained(root, "b", seed=1, base=84.0)  # the same seed again, elsewhere
    _trained(root, "c", seed=2, base=90.0)
    warnings = []
    table = base_novel_table(find_runs(root))
    row = table.rows[1]
    assert row[-1] == 2  # seeds, not runs
    assert row[2][0] == pytest.approx((82.0 + 90.0) / 2) and row[2][1] == pytest.approx(math.sqrt(32))
    assert len(table.warnings) == 1 and "seed 1 appears in 2 runs" in table.warnings[0]
    write_report(root, str(tmp_path / "out"), warn=warnings.append)
    assert warnings == table.warnings
    assert "> warning: dataset DTD, protocol base2novel, method drople-drop" in (tmp_path / "out" / "base2novel.md").read_text()


def test_mixed_configurations_warn(tmp_path):
    root = str(tmp_path)
    fp = {"config": {"lr": 0.0002, "seed": 1, "epochs": 5, "iwtd": {"mode": "drop"}}, "data": "aaa", "version": "0.1.0"}
    _trained(root, "a", seed=1, fingerprint=fp)
    fp2 = {"config": {**fp["config"], "lr": 0.001, "seed": 2}, "data": "bbb", "version": "0.1.0"}
    _trained(root, "b", seed=2, fingerprint=fp2)
    table = base_novel_table(find_runs(root))
    assert len(table.warnings) == 1
    # seed and data differ by design: only lr is named
    assert table.warnings[0].endswith("its 2 runs differ in lr: 0.0002, 0.001; averaging them mixes configurations")


def test_metric_table_generic_and_few_shot(tmp_path):
    root = str(tmp_path)
    for seed, acc in enumerate([60.0, 62.0], 1):
        _run(root, f"dg/v2/{seed}", dataset="ImageNetV2", seed=seed, protocol="dg", acc=acc, zs_acc=55.0)
    _run(root, "dg/sketch/1", dataset="ImageNetSketch", seed=1, protocol="dg", acc=48.0, zs_acc=40.0)
    for shots, acc in ((2, 50.0), (16, 70.0)):
        _run(root, f"fs/{shots}", dataset="DTD", seed=1, protocol="few_shot", shots=shots, acc=acc)
    runs = find_runs(root)
    table = metric_table(runs, "dg")
    assert table.header == ["Dataset", "Method", "acc", "Seeds"]  # zs_acc is a zero-shot row, not a column
    assert [r[:2] for r in table.rows] == [["ImageNetSketch", "zero-shot CLIP"], ["ImageNetSketch", "drople"],
                                           ["ImageNetV2", "zero-shot CLIP"], ["ImageNetV2", "drople"],
                                           ["Average", "zero-shot CLIP"], ["Average", "drople"]]
    assert table.rows[3][2] == (61.0, pytest.approx(math.sqrt(2)))
    assert table.rows[-1][2][0] == pytest.approx((48 + 61) / 2) and table.rows[-2][2][0] == pytest.approx(47.5)
    table = metric_table(runs, "few_shot")
    assert table.header == ["Dataset", "Method", "shots", "acc", "Seeds"]  # shots tells rows apart, not averaged
    assert [(r[2], r[3][0]) for r in table.rows] == [(2, 50.0), (16, 70.0)]


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
    _trained(runs_dir, "p1", seed=1, base=80, novel=70, images_per_s=100.0, mode="perturb")
    _trained(runs_dir, "p2", seed=2, base=82, novel=72, images_per_s=110.0, mode="perturb")
    _trained(runs_dir, "d3", seed=3, base=81, novel=71, images_per_s=200.0, mode="drop")
    _run(runs_dir, "xd/1", dataset="EuroSAT", seed=1, protocol="cross_dataset", acc=45.5)
    paths = write_report(runs_dir, out)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["accuracy_vs_throughput.png", "base2novel.csv", "base2novel.md", "cross_dataset.csv", "cross_dataset.md"]
    with open(os.path.join(out, "base2novel.csv")) as f:
        table = list(csv.reader(f))
    assert table[0] == ["Dataset", "Method", "shots", "epochs", "model", "precision", "Base_mean", "Base_std",
                        "Novel_mean", "Novel_std", "HM_mean", "HM_std", "Seeds"]
    assert table[2][:2] == ["DTD", "drople-drop"] and float(table[2][6]) == pytest.approx(81.0) and table[2][-1] == "1"
    assert table[3][1] == "drople-perturb" and table[3][-1] == "2"
    png = open(os.path.join(out, "accuracy_vs_throughput.png"), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    pts = throughput_points(find_runs(runs_dir))
    assert [p.label for p in pts] == ["drople-drop", "drople-perturb"]
    assert pts[1].images_per_s == (105.0, pytest.approx(math.sqrt(50)))
    assert pts[1].accuracy[0] == pytest.approx(harmonic_mean(81, 71))  # as the table gives it
    fig = accuracy_figure(pts, zero_shot=zero_shot_levels(find_runs(runs_dir)))
    ax = fig.axes[0]
    assert ax.get_title() == "DTD on CPU X (2 cores)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["zero-shot CLIP", "drople-drop", "drople-perturb"]
    zs_line = [line for line in ax.lines if line.get_label() == "zero-shot CLIP"]
    assert zs_line[0].get_ydata()[0] == pytest.approx(harmonic_mean(70.0, 72.0))
    assert len(ax.containers) == 2 and all(c.has_yerr and c.has_xerr for c in ax.containers)  # error bars
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


def test_cli_prints_warnings(tmp_path, capsys):
    from drople_fast.training.cli import main

    _trained(str(tmp_path / "r"), "a", seed=1)
    _trained(str(tmp_path / "r"), "b", seed=1)
    assert main(["report", str(tmp_path / "r"), str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("report: warning: dataset DTD, protocol base2novel, method drople-drop, shots 16")
    assert "seed 1 appears in 2 runs" in err
