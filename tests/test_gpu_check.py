"""bench/gpu_check.py cannot rot: its --cpu-dry mode runs every step on CPU with tiny shapes."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("triton") is None or importlib.util.find_spec("open_clip") is None:
    pytest.skip("triton and open_clip are needed", allow_module_level=True)


def _run(*args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cpu_dry_run_passes_every_step(tmp_path):
    proc = _run("--cpu-dry", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_check-cpu-dry.json").read_text())
    assert report["dry"] and set(report["steps"]) == {"env", "masks", "determinism", "modes", "compiled",
                                                      "speed_op", "speed_step"}
    assert all(s["status"] == "ok" for s in report["steps"].values())
    assert (tmp_path / "gpu_check-cpu-dry.md").read_text().startswith("# drople_fast GPU check")


def test_refuses_without_cuda(tmp_path):
    proc = _run("--out", str(tmp_path), env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "refuses to run without" in proc.stderr


def test_spent_budget_skips_the_steps_fails_the_run_and_still_reports(tmp_path):
    # bench/gpu_check.sh passes what is left of its 8 minutes: with nothing left every step is recorded as
    # skipped, the run fails, and the report is written all the same.
    proc = _run("--cpu-dry", "--only", "env,determinism", "--budget-s", "0.5", "--out", str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    steps = json.loads((tmp_path / "gpu_check-cpu-dry.json").read_text())["steps"]
    assert list(steps) == ["env", "determinism"]
    assert all(s["status"] == "skipped" and "budget" in s["error"] for s in steps.values())
    assert "skipped" in (tmp_path / "gpu_check-cpu-dry.md").read_text()
