"""The drople-fast CLI: launch + report, eval, bad input (exit 2, one line, no complete run), DDP via torchrun."""
import json
import os
import socket
import subprocess
import sys

import pytest

from drople_fast.training.cli import main
from drople_fast.training.data import write_synthetic_coop_dataset

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--epochs", "1", "--batch-size", "2", "--shots", "2", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    write_synthetic_coop_dataset(root, num_classes=4, images_per_class=8, seed=0)
    # a second dataset in the registry's layout (OxfordPets: oxford_pets/images + split_zhou_OxfordPets.json)
    write_synthetic_coop_dataset(root, name="oxford_pets", num_classes=6, images_per_class=8, seed=1)
    return root


def complete_runs(folder):
    return [d for d, _, files in os.walk(folder) if "metrics.json" in files]


def test_launch_and_report(data_root, tmp_path, capsys):
    out = tmp_path / "runs"
    rc = main(["launch", "--datasets", "Synthetic", "OxfordPets", "--seeds", "1", "2", "--root", data_root,
               "--output-dir", str(out), *FAST])
    assert rc == 0
    assert len(complete_runs(out)) == 4
    assert (out / "base2novel" / "OxfordPets" / "seed2" / "metrics.json").exists()
    # a second launch skips finished runs
    assert main(["launch", "--datasets", "Synthetic", "--seeds", "1", "--root", data_root,
                 "--output-dir", str(out), *FAST]) == 0
    capsys.readouterr()
    assert main(["report", str(out), str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "base2novel.md").read_text()
    assert "| Synthetic |" in md and "| OxfordPets |" in md and "| Average |" in md
    assert (tmp_path / "report" / "base2novel.csv").exists()
    assert (tmp_path / "report" / "accuracy_vs_throughput.png").stat().st_size > 0


def test_eval_writes_table(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "Synthetic", "--root", data_root, "--output-dir", str(run), *FAST]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| Zero-shot CLIP |" in printed and "HM" in printed
    table = (run / "eval" / "Synthetic_base2novel.md").read_text()
    saved = json.loads((run / "metrics.json").read_text())
    assert f"{saved['base_acc']:.2f}" in table  # same weights, same numbers
    # evaluate the same prompts on another dataset with all its classes
    assert main(["eval", str(run), "--dataset", "OxfordPets", "--protocol", "few_shot", "--no-progress"]) == 0
    assert (run / "eval" / "OxfordPets_few_shot.md").exists()


def _error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("drople-fast: error:"), err
    assert "Traceback" not in err
    return err


def test_bad_inputs_exit_2_without_complete_run(data_root, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--output-dir", str(out), *FAST]
    assert "Nope" in _error(capsys, ["train", "--dataset", "Nope", "--root", data_root, *common])
    assert "missing-root" in _error(capsys, ["train", "--dataset", "DTD", "--root", str(tmp_path / "missing-root"),
                                             *common])
    assert "dtd" in _error(capsys, ["train", "--dataset", "DTD", "--root", data_root, *common])  # not there
    assert "warp" in _error(capsys, ["train", "--dataset", "Synthetic", "--protocol", "warp", "--root", data_root,
                                     *common])
    too_many = ["train", "--dataset", "Synthetic", "--root", data_root, "--output-dir", str(out), "--epochs", "1",
                "--shots", "50", "--threads", "1", "--no-progress"]
    assert "50 shots" in _error(capsys, too_many)
    assert "nowhere.pt" in _error(capsys, ["train", "--dataset", "Synthetic", "--root", data_root, "--pretrained",
                                           str(tmp_path / "nowhere.pt"), *common])
    assert not out.exists()  # nothing was created for any of them

    # truncated pretrained weights and a truncated run checkpoint
    good = tmp_path / "good"
    assert main(["train", "--dataset", "Synthetic", "--root", data_root, "--output-dir", str(good), *FAST]) == 0
    capsys.readouterr()
    blob = (good / "checkpoint.pt").read_bytes()
    bad_weights = tmp_path / "weights.pt"
    bad_weights.write_bytes(blob[: len(blob) // 3])
    assert "weights.pt" in _error(capsys, ["train", "--dataset", "Synthetic", "--root", data_root, "--pretrained",
                                           str(bad_weights), *common])
    assert not out.exists()
    (good / "checkpoint.pt").write_bytes(blob[: len(blob) // 2])
    assert "checkpoint.pt" in _error(capsys, ["eval", str(good), "--no-progress"])
    (good / "metrics.json").unlink()
    assert "checkpoint.pt" in _error(capsys, ["train", "--dataset", "Synthetic", "--root", data_root,
                                              "--output-dir", str(good), "--resume", *FAST])
    assert not (good / "metrics.json").exists()
    # a checkpoint of another architecture (LoRA rank 2) for a learner with the default rank 8
    other = tmp_path / "other"
    assert main(["train", "--dataset", "Synthetic", "--root", data_root, "--output-dir", str(other),
                 "--lora-rank", "2", *FAST]) == 0
    capsys.readouterr()
    cfg = json.loads((good / "config.json").read_text())
    os.replace(other / "checkpoint.pt", good / "checkpoint.pt")
    assert "does not match" in _error(capsys, ["eval", str(good), "--checkpoint", str(good / "checkpoint.pt"),
                                               "--no-progress"])
    assert cfg["lora_rank"] == 8


def test_subprocess_error_is_one_line(data_root, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT_DIR)
    res = subprocess.run([sys.executable, "-m", "drople_fast", "train", "--dataset", "Imagenett", "--root", data_root,
                          "--output-dir", str(tmp_path / "x")], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2
    lines = [s for s in res.stderr.splitlines() if s.startswith("drople-fast")]
    assert lines and "Imagenett" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "x").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_gloo(data_root, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT_DIR)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "drople_fast", "train",
           "--dataset", "Synthetic", "--root", data_root, "--shots", "4", "--epochs", "2", "--batch-size", "2",
           "--device", "cpu", "--output-dir", str(out), "--no-progress", "--threads", "1"]
    res = subprocess.run(cmd, cwd=ROOT_DIR, env=env, capture_output=True, timeout=180)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["info"]["world_size"] == 2
    history = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    # 2 base classes x 4 shots = 8 images = 2 ranks x batch 2 x 2 steps per epoch
    assert [h["images"] for h in history] == [8, 8]


def test_sigma_option_reaches_the_config(tmp_path, capsys):
    # --sigma is how a command-line user turns perturb mode's noise off (the release's --noise_injection_sigma 0)
    from drople_fast.clip.config import IWTDConfig
    from drople_fast.training.cli import _config, build_parser

    base = ["train", "--dataset", "Synthetic", "--root", str(tmp_path), "--output-dir", str(tmp_path / "run")]
    args = build_parser().parse_args(base)
    assert _config(args, args.dataset, args.seed, args.output_dir, False).iwtd.sigma == IWTDConfig().sigma
    args = build_parser().parse_args(base + ["--mode", "perturb", "--sigma", "0"])
    cfg = _config(args, args.dataset, args.seed, args.output_dir, False)
    assert (cfg.iwtd.mode, cfg.iwtd.sigma) == ("perturb", 0.0)
    assert "sigma" in _error(capsys, base + ["--mode", "perturb", "--sigma", "-0.1"])
    assert not (tmp_path / "run").exists()
