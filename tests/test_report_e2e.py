"""bench/report_e2e.py: rows keyed by precision (speedups within one precision, a CSV precision column);
bench/report_learner_step.py: speedups against the baseline case of the same class count, and the goals."""
import csv
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import report_e2e  # noqa: E402  (bench/ is scripts, not a package)
import report_learner_step  # noqa: E402


def _bench(case, median, precision=None, tokens=201.0):
    info = dict(case=case, kind="image", batch=8, device="cpu", device_name="x", threads=1, loadavg=0.0, layers=2,
                full_tokens=201, tokens_per_layer=[tokens, tokens], width_per_layer=[201, 201])
    if precision is not None:  # JSON written before the precision dimension has none: fp32
        info["precision"] = precision
    return {"stats": {"median": median, "min": median, "rounds": 3}, "extra_info": info}


def test_rows_are_keyed_by_precision(tmp_path):
    report = report_e2e
    data = {"benchmarks": [_bench("unpatched", 4.0), _bench("off", 2.0, "fp32"),
                           _bench("unpatched", 2.0, "bf16"), _bench("off", 1.0, "bf16")]}
    rows = {(r["case"], r["precision"]): r for r in report.rows_from(data)}
    assert rows[("off", "fp32")]["speedup"] == 2.0
    assert rows[("off", "bf16")]["speedup"] == 2.0  # against the bf16 unpatched step, not the fp32 one
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps(data))
    report.main([str(path), "--out", str(tmp_path)])
    with open(tmp_path / "e2e.csv", newline="") as f:
        got = [(r["case"], r["precision"]) for r in csv.DictReader(f)]
    assert got == [("unpatched", "fp32"), ("off", "fp32"), ("unpatched", "bf16"), ("off", "bf16")]
    text = (tmp_path / "e2e.md").read_text()
    assert "| off | bf16 |" in text and "bf16 / fp32 unpatched 2.00x, off 2.00x." in text


def _step(classes, mode, precision, teacher, median):
    info = dict(kind="learner_step", classes=classes, mode=mode, precision=precision, teacher=teacher, batch=4,
                text_s=median / 4, image_s=median / 4, teacher_s=0.0, device="cpu", device_name="x", threads=1,
                cpu_capability="AVX2", loadavg=0.5)
    return {"stats": {"median": median, "min": median, "rounds": 3}, "extra_info": info}


def test_learner_step_speedups_per_class_count_and_goals(tmp_path):
    data = {"benchmarks": [_step(24, "perturb", "fp32", "recomputed", 6.0), _step(24, "drop", "bf16", "cached", 2.0),
                           _step(100, "perturb", "fp32", "recomputed", 9.0),
                           _step(100, "drop", "bf16", "cached", 6.0)]}
    path = tmp_path / "step.json"
    path.write_text(json.dumps(data))
    report_learner_step.main([str(path), "--out", str(tmp_path)])
    with open(tmp_path / "learner_step.csv", newline="") as f:
        got = {(int(r["classes"]), r["mode"]): float(r["speedup"]) for r in csv.DictReader(f)}
    assert got == {(24, "perturb"): 1.0, (24, "drop"): 3.0, (100, "perturb"): 1.0, (100, "drop"): 1.5}
    text = (tmp_path / "learner_step.md").read_text()
    assert "24 classes, drop/bf16/cached: 3.00x (goal >= 3x, met)" in text
    assert "100 classes, drop/bf16/cached: 1.50x (goal >= 2x, not met)" in text
