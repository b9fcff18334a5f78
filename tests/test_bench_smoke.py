"""bench/ stays runnable: every benchmark file runs at its smoke size (BENCH_SMOKE=1, bench/smoke.py),
and every report script regenerates its committed tables from the committed JSON byte for byte (the
README's tables come from bench/results/, never by hand)."""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
# pytest-benchmark suites hold tests; the rest are scripts with a main() of their own.
SUITES = sorted(p for p in BENCH.glob("bench_*.py") if "\ndef test_" in p.read_text(encoding="utf-8"))
SCRIPTS = sorted(p for p in BENCH.glob("bench_*.py") if p not in SUITES)


def _env():
    return {**os.environ, "BENCH_SMOKE": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def test_every_suite_runs_at_smoke_size(tmp_path):
    assert SUITES, "no benchmark suites found in bench/"
    junit = tmp_path / "smoke.xml"
    # --benchmark-disable: each benchmarked function runs once, untimed; -x keeps a broken file short
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--benchmark-disable",
           f"--junitxml={junit}", *map(str, SUITES)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        if not any(child.tag in ("failure", "error", "skipped") for child in case):
            module = case.get("classname").split(".")[-1]
            passed[module] = passed.get(module, 0) + 1
    never_ran = [p.stem for p in SUITES if not passed.get(p.stem)]
    assert not never_ran, f"benchmark files with no test that ran (all skipped?): {never_ran}"


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_every_script_runs_at_smoke_size(script):
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.stdout.strip(), f"{script.name} printed nothing"


# report scripts (report_io.py is their shared helper module, not a script)
REPORTS = sorted(p for p in BENCH.glob("report_*.py") if '__name__ == "__main__"' in p.read_text(encoding="utf-8"))


def test_every_report_has_a_committed_result():
    for report in REPORTS:
        name = report.stem[len("report_"):]
        assert (RESULTS / f"{name}.json").exists(), f"{report.name} has no bench/results/{name}.json"


@pytest.mark.parametrize("report", REPORTS, ids=[p.stem for p in REPORTS])
def test_reports_regenerate_the_committed_tables(report, tmp_path):
    name = report.stem[len("report_"):]
    committed = [p for p in (RESULTS / f"{name}.md", RESULTS / f"{name}.csv") if p.exists()]
    assert committed, f"bench/results holds no table of {report.name}"
    cmd = [sys.executable, str(report), str(RESULTS / f"{name}.json")]
    help_text = subprocess.run(cmd[:2] + ["--help"], capture_output=True, text=True, env=_env()).stdout
    cmd += ["--out", str(tmp_path)] if "--out" in help_text else ["--csv", str(tmp_path / f"{name}.csv")]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    regenerated = [p for p in committed if (tmp_path / p.name).exists()]
    assert regenerated, f"{report.name} wrote none of {[p.name for p in committed]}"
    for path in regenerated:
        assert (tmp_path / path.name).read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), \
            f"bench/results/{path.name} is not what {report.name} makes of {name}.json: regenerate it"
