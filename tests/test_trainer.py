"""Trainer end to end on a tiny CoOp dataset: IWTD modes, resume after SIGKILL (DDP: test_cli.py)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from drople_fast.training.data import write_synthetic_coop_dataset
from drople_fast.training.report import read_metrics
from drople_fast.training.trainer import CHECKPOINT, load_checkpoint, train
from run_config import tiny_run_config

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_synthetic_coop_dataset(str(root), num_classes=4, images_per_class=8, image_size=32, seed=0)
    return str(root)


def config(root, out, **kw):
    return tiny_run_config(root, out, **{"shots": 4, "epochs": 2, **kw})


@pytest.mark.parametrize("mode", ["off", "perturb", "drop", "drop_fixed"])
def test_base_to_novel_two_epochs(data_root, tmp_path, mode):
    out = tmp_path / "run"
    metrics = train(config(data_root, out, iwtd={"mode": mode}))
    for key in ("base_acc", "novel_acc", "hm", "zs_base_acc", "images_per_s"):
        assert key in metrics
    assert read_metrics(str(out / "metrics.json"))["protocol"] == "base2novel"  # report's schema
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in lines] == [1, 2]
    assert lines[-1]["loss"] < lines[0]["loss"], lines
    table = (out / "results.md").read_text()
    assert "| Zero-shot CLIP |" in table and "Novel" in table and f"DroPLe ({mode})" in table
    saved = json.loads((out / "config.json").read_text())
    assert saved["iwtd"]["mode"] == mode
    assert load_checkpoint(str(out / CHECKPOINT))["epoch"] == 2


def test_existing_run_needs_resume(data_root, tmp_path):
    out = tmp_path / "run"
    train(config(data_root, out, epochs=1))
    with pytest.raises(ValueError, match="already holds a run"):
        train(config(data_root, out, epochs=1))
    again = train(config(data_root, out, epochs=1, resume=True))  # complete: returns its metrics
    assert again["base_acc"] == json.loads((out / "metrics.json").read_text())["base_acc"]


def _cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT_DIR)
    return subprocess.Popen([sys.executable, "-m", "drople_fast", *args], cwd=ROOT_DIR, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(data_root, tmp_path):
    epochs = 3
    full = tmp_path / "full"
    train(config(data_root, full, epochs=epochs, lr=2e-4, lora_rank=2, shots=4, batch_size=2))

    killed = tmp_path / "killed"
    args = ["train", "--dataset", "Synthetic", "--root", data_root, "--shots", "4", "--epochs", str(epochs),
            "--batch-size", "2", "--lr", "2e-4", "--lora-rank", "2", "--output-dir", str(killed), "--threads", "1",
            "--no-progress"]
    # same few-shot cache location as the in-process run is not needed: sampling is seeded
    proc = _cli(args)
    ckpt = killed / CHECKPOINT
    deadline = time.time() + 60
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (killed / "metrics.json").exists()
    assert 1 <= load_checkpoint(str(ckpt))["epoch"] < epochs

    resumed = _cli(args + ["--resume"])
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err.decode()[-2000:]
    a, b = load_checkpoint(str(full / CHECKPOINT)), load_checkpoint(str(ckpt))
    assert a["epoch"] == b["epoch"] == epochs
    for name, tensor in a["learner"].items():
        assert torch.equal(tensor, b["learner"][name]), name
    for name, tensor in a["patch"]["bridge"].items():
        assert torch.equal(tensor, b["patch"]["bridge"][name]), name
    assert a["patch"]["counters"] == b["patch"]["counters"]
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    ma, mb = json.loads((full / "metrics.json").read_text()), json.loads((killed / "metrics.json").read_text())
    assert (ma["base_acc"], ma["novel_acc"]) == (mb["base_acc"], mb["novel_acc"])
