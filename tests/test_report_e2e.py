"""bench/report_e2e.py: rows keyed by precision (speedups within one precision, a CSV precision column)."""
import csv
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report():
    spec = importlib.util.spec_from_file_location("report_e2e", os.path.join(ROOT, "bench", "report_e2e.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(case, median, precision=None, tokens=201.0):
    info = dict(case=case, kind="image", batch=8, device="cpu", device_name="x", threads=1, loadavg=0.0, layers=2,
                full_tokens=201, tokens_per_layer=[tokens, tokens], width_per_layer=[201, 201])
    if precision is not None:  # JSON written before the precision dimension has none: fp32
        info["precision"] = precision
    return {"stats": {"median": median, "min": median, "rounds": 3}, "extra_info": info}


def test_rows_are_keyed_by_precision(tmp_path):
    report = _report()
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
