"""Faults a hostile user or a failing machine causes, and the exact outcome each must have.

The CLI is driven in subprocesses where the fault needs one (SIGKILL, a second
writer, a read-only file system, a file-size limit); the rest run in process.
Every failure must be one line on stderr, exit code 2, no traceback, no
partial files, and no damage to anything another run owns.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from drople_fast.training import run_dir as rd
from drople_fast.training.cli import main
from drople_fast.training.data import write_synthetic_coop_dataset
from drople_fast.training.trainer import TrainConfig, train
from run_config import tiny_run_config

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--epochs", "1", "--batch-size", "2", "--shots", "2", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    write_synthetic_coop_dataset(root, num_classes=4, images_per_class=6, image_size=32, seed=0)
    return root


def config(root, out, **kw):
    return tiny_run_config(root, out, **kw)


def cli(args, preexec_fn=None, wrap=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT_DIR, XDG_CACHE_HOME=os.environ.get("TMPDIR", "/tmp"))
    env.pop("DROPLE_FAST_DEBUG", None)
    return subprocess.Popen([*wrap, sys.executable, "-m", "drople_fast", *args], cwd=ROOT_DIR, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec_fn)


def one_line_error(proc, timeout=180) -> str:
    """Wait for ``proc``; assert it failed with exit code 2 and one ``drople-fast: error:`` line."""
    _, err = proc.communicate(timeout=timeout)
    text = err.decode()
    lines = [line for line in text.splitlines() if line.strip()]
    assert proc.returncode == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in lines if line.startswith("drople-fast: error:")]
    assert len(errors) == 1, text[-3000:]
    return errors[0]


def assert_main_error(capsys, argv, *fragments):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("drople-fast: error:"), err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    return err[0]


def tmp_leftovers(folder) -> list:
    return [n for n in os.listdir(folder) if ".tmp" in n] if os.path.isdir(folder) else []


# --------------------------------------------------------------------------
# 1. fingerprinted run directories
# --------------------------------------------------------------------------


def test_finished_run_is_reused_only_under_the_same_fingerprint(data_root, tmp_path, capsys):
    out = tmp_path / "runs"
    base = ["launch", "--datasets", "Synthetic", "--seeds", "1", "--root", data_root, "--output-dir", str(out)]
    assert main(base + ["--shots", "2", "--epochs", "1", "--mode", "drop", "--batch-size", "2", "--threads", "1",
                        "--no-progress"]) == 0
    run = out / "base2novel" / "Synthetic" / "seed1"
    before = (run / "metrics.json").read_bytes()
    line = assert_main_error(capsys, base + ["--shots", "3", "--epochs", "2", "--mode", "perturb", "--batch-size",
                                             "2", "--threads", "1", "--no-progress", "--report"],
                             "another configuration", "shots: 2 -> 3", "epochs: 1 -> 2", "iwtd.mode: 'drop' -> 'perturb'")
    assert "data" in line  # the few-shot split differs too (3 shots)
    assert (run / "metrics.json").read_bytes() == before
    assert not (out / "report").exists()
    # the same configuration is reused as it is
    assert main(base + ["--shots", "2", "--epochs", "1", "--mode", "drop", "--batch-size", "2", "--threads", "1",
                        "--no-progress"]) == 0
    assert (run / "metrics.json").read_bytes() == before


def test_data_split_is_fingerprinted(data_root, tmp_path):
    out = tmp_path / "run"
    train(config(data_root, out))
    other = str(tmp_path / "data2")
    write_synthetic_coop_dataset(other, num_classes=4, images_per_class=8, image_size=32, seed=0)
    with pytest.raises(rd.RunDirError, match="data:"):
        train(config(other, out, resume=True))


# --------------------------------------------------------------------------
# 2. one writer per run directory
# --------------------------------------------------------------------------


def test_second_writer_is_refused_and_the_directory_survives(data_root, tmp_path):
    out = tmp_path / "run"
    holder = rd.RunDir(str(out)).open()  # this test process is the first writer
    try:
        (out / "config.json").write_text("{}")
        proc = cli(["train", "--dataset", "Synthetic", "--root", data_root, "--output-dir", str(out), "--resume",
                    *FAST])
        line = one_line_error(proc)
        assert "in use by another drople-fast process" in line and f"pid {os.getpid()}" in line
        assert (out / "config.json").read_text() == "{}" and (out / ".lock").exists()
        with pytest.raises(rd.RunDirError, match="in use"):
            rd.RunDir(str(out)).open()
    finally:
        holder.close()
    rd.RunDir(str(out)).open().close()  # released: the next writer gets it


def test_failure_before_first_checkpoint_never_removes_what_it_did_not_create(data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="diverged|lr"):
        train(config(data_root, out, lr=1e30))
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(out)) == [".lock", "notes.txt"]


# --------------------------------------------------------------------------
# 3, 4, 11. report and split files: confined paths, neutral CSV, no NaN
# --------------------------------------------------------------------------


def _metrics(folder, **over):
    m = {"dataset": "Synthetic", "seed": 1, "protocol": "base2novel", "base_acc": 50.0, "novel_acc": 40.0,
         "hm": 2 * 50 * 40 / 90}
    m.update(over)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(m, f)


@pytest.mark.parametrize("protocol", ["../../escaped", "/tmp/absolute", "a/b", ".."])
def test_report_never_writes_outside_its_folder(tmp_path, capsys, protocol):
    _metrics(tmp_path / "runs" / "r1", protocol=protocol, acc=1.0)
    before = set(os.listdir(tmp_path))
    assert_main_error(capsys, ["report", str(tmp_path / "runs"), str(tmp_path / "out" / "report")], "protocol")
    assert set(os.listdir(tmp_path)) == before
    assert not os.path.exists("/tmp/absolute.md")


def test_report_csv_neutralises_formulas(tmp_path, capsys):
    _metrics(tmp_path / "runs" / "r1", dataset="=HYPERLINK(\"http://x\")")
    _metrics(tmp_path / "runs" / "r2", dataset="@SUM(A1)", seed=2)
    assert main(["report", str(tmp_path / "runs"), str(tmp_path / "rep")]) == 0
    cells = [row.split(",")[0] for row in (tmp_path / "rep" / "base2novel.csv").read_text().splitlines()[1:]]
    assert any(c.startswith("\"'=HYPERLINK") or c.startswith("'=HYPERLINK") for c in cells), cells
    assert "'@SUM(A1)" in cells
    assert not any(c.startswith(("=", "+", "-", "@")) for c in cells)


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_report_refuses_non_finite_fields(tmp_path, capsys, value):
    folder = tmp_path / "runs" / "r1"
    _metrics(folder)
    path = folder / "metrics.json"
    path.write_text(path.read_text().replace('"base_acc": 50.0', f'"base_acc": {value}'))
    assert_main_error(capsys, ["report", str(tmp_path / "runs")], "base_acc", str(path))


@pytest.mark.parametrize("bad", ["../outside.jpg", "/etc/passwd", "class0/../../x.jpg"])
def test_split_file_paths_are_confined(tmp_path, bad):
    from drople_fast.training.data import get_dataset

    root = str(tmp_path)
    write_synthetic_coop_dataset(root, num_classes=2, images_per_class=3, image_size=16, seed=0)
    split_file = os.path.join(root, "synthetic", "split_zhou_Synthetic.json")
    split = json.load(open(split_file))
    split["train"][1][0] = bad
    json.dump(split, open(split_file, "w"))
    with pytest.raises(ValueError, match=r"train\[1\]") as info:
        get_dataset("Synthetic", root)
    assert repr(bad) in str(info.value)


def test_base_class_without_training_images_is_an_error(tmp_path):
    from drople_fast.training.protocols import build_plan

    root = str(tmp_path)
    write_synthetic_coop_dataset(root, num_classes=4, images_per_class=3, image_size=16, seed=0)
    split_file = os.path.join(root, "synthetic", "split_zhou_Synthetic.json")
    split = json.load(open(split_file))
    split["train"] = [item for item in split["train"] if item[1] != 1]
    json.dump(split, open(split_file, "w"))
    with pytest.raises(ValueError, match="have no training image") as info:
        build_plan("base2novel", "Synthetic", root, shots=0, seed=1)
    assert "1 (" in str(info.value)


# --------------------------------------------------------------------------
# 5, 6, 7, 11. checkpoints: SHA-256, resume conditions, divergence
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train(config(data_root, out))
    return out


def test_flipped_checkpoint_byte_is_refused(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    ckpt = run / rd.CHECKPOINT
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0x01
    ckpt.write_bytes(bytes(data))
    with pytest.raises(rd.RunDirError, match="damaged"):
        rd.load_checkpoint(str(ckpt))
    assert_main_error(capsys, ["eval", str(run), "--no-progress", "--device", "cpu"], "damaged", str(ckpt))


def test_checkpoint_without_checksum_or_field_is_refused(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    ckpt = str(run / rd.CHECKPOINT)
    payload = torch.load(ckpt, weights_only=True)
    del payload["optimizer"]
    rd.save_checkpoint(ckpt, payload)
    with pytest.raises(rd.RunDirError, match=r"lacks field\(s\) \['optimizer'\]"):
        rd.load_checkpoint(ckpt)
    os.remove(ckpt + rd.CHECKSUM_SUFFIX)
    with pytest.raises(rd.RunDirError, match="no checksum"):
        rd.load_checkpoint(ckpt)


@pytest.mark.parametrize("content,fragment", [
    ('{"iwtd": [1, 2]}', "iwtd"), ("[]", "JSON object"), ('{"epochs": "3"}', "epochs"), ("{not json", "not valid JSON"),
])
def test_malformed_config_on_eval_is_one_line(finished, tmp_path, capsys, content, fragment):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "config.json").write_text(content)
    assert_main_error(capsys, ["eval", str(run), "--no-progress", "--device", "cpu"], fragment)


def test_resume_with_other_threads_or_workers_is_refused(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    os.remove(run / "metrics.json")  # an unfinished run (epoch 1 of 1 checkpointed)
    saved = json.loads((run / "config.json").read_text())
    saved.update(resume=True, output_dir=str(run))
    for kw, fragment in ((dict(num_threads=2), "pass --threads 1"), (dict(num_workers=1), "pass --num-workers 0")):
        with pytest.raises(rd.RunDirError, match=fragment):
            train(TrainConfig.from_dict({**saved, **kw}))


def test_checkpoint_epoch_beyond_epochs_is_refused(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    os.remove(run / "metrics.json")
    saved = json.loads((run / "config.json").read_text())
    saved.update(epochs=1, resume=True, output_dir=str(run))
    ckpt = torch.load(str(run / rd.CHECKPOINT), weights_only=True)
    ckpt["epoch"] = 3
    rd.save_checkpoint(str(run / rd.CHECKPOINT), ckpt)
    with pytest.raises(rd.RunDirError, match="epoch 3 exceeds epochs=1"):
        train(TrainConfig.from_dict(saved))


def test_divergence_stops_with_the_step_and_never_finishes(data_root, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"diverged: .* at epoch 1 step \d+"):
        train(config(data_root, out, lr=1e30))
    assert not out.exists() or not any(n in os.listdir(out) for n in ("metrics.json", "checkpoint.pt"))


# --------------------------------------------------------------------------
# 12 and the crash list: contradictory options and bad values up front (in process: no training)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("extra,fragment", [
    (["--mode", "drop", "--keep-ratio", "0.3"], "only applies to mode='drop_fixed'"),
    (["--mode", "drop_fixed", "--keep-ratio", "1.5"], "keep_ratio"),
    (["--targets", "OxfordPets"], "targets only apply"),
    (["--imbalance", "5"], "imbalance only applies"),
    (["--lora-rank", "-2"], "lora_rank"),
    (["--threads", "-1"], "--threads"),
    (["--device", "tpu9"], "device"),
    (["--lr", "inf"], "lr"),
    (["--lr", "nan"], "lr"),
    (["--p-min", "nan"], "p_min"),
])
def test_contradictory_or_bad_options_are_one_line_errors(data_root, tmp_path, capsys, extra, fragment):
    out = tmp_path / "run"
    assert_main_error(capsys, ["train", "--dataset", "Synthetic", "--root", data_root, "--output-dir", str(out),
                               *FAST, *extra], fragment)
    assert not out.exists()


def test_output_dir_that_is_a_file(data_root, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert_main_error(capsys, ["train", "--dataset", "Synthetic", "--root", data_root, "--output-dir", str(target),
                               *FAST], "not a directory")
    assert target.read_text() == "x"


def test_load_patch_state_dict_without_counters():
    import drople_fast as df
    from drople_fast.training.tiny_clip import create_tiny_clip

    model = df.apply(create_tiny_clip())
    saved = df.patch_state_dict(model)
    del saved["counters"]
    with pytest.raises(ValueError, match="counters"):
        df.load_patch_state_dict(model, saved)


def test_torch_save_of_a_patched_model_round_trips(tmp_path):
    import drople_fast as df
    from drople_fast.training.tiny_clip import create_tiny_clip

    model = df.apply(create_tiny_clip(), df.IWTDConfig(mode="drop"))
    model.train()
    images = torch.randn(2, 3, 32, 32)
    model.encode_image(images)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert df.is_patched(loaded) and df.patch_state_dict(loaded)["counters"] == {"vision": 1, "text": 0}
    model.eval(), loaded.eval()
    assert torch.equal(model.encode_image(images), loaded.encode_image(images))
    df.remove(loaded)
    assert type(loaded.visual).__name__ == "VisionTransformer"


def test_stale_tmp_files_are_removed_on_the_next_start(data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt.tmp99999").write_bytes(b"partial")
    (out / "metrics.json.tmp12345").write_text("{")
    train(config(data_root, out))
    assert tmp_leftovers(out) == []


# --------------------------------------------------------------------------
# subprocess faults: SIGKILL, file-size limit, read-only file systems
# --------------------------------------------------------------------------


def _train_args(root, out, epochs=3):
    return ["train", "--dataset", "Synthetic", "--root", root, "--output-dir", str(out), "--epochs", str(epochs),
            "--batch-size", "2", "--shots", "2", "--threads", "1", "--no-progress"]


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_then_resume(data_root, tmp_path):
    """Kill the writer while it is inside the checkpoint write (a tmp file exists): the run resumes
    from a verified checkpoint, the tmp file is gone, and the result equals an uninterrupted run."""
    full = tmp_path / "full"
    proc = cli(_train_args(data_root, full))
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]

    out = tmp_path / "killed"
    proc = cli(_train_args(data_root, out))
    deadline = time.time() + 120

    def in_checkpoint_write():  # its tmp file (or, if the write was too quick to see, its result) exists
        return any(n.startswith("checkpoint.pt") for n in tmp_leftovers(out)) or (out / rd.CHECKPOINT).exists()

    while proc.poll() is None and time.time() < deadline and not in_checkpoint_write():
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "metrics.json").exists()
    resumed = cli(_train_args(data_root, out) + ["--resume"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-2000:]
    assert tmp_leftovers(out) == []
    a, b = rd.load_checkpoint(str(full / rd.CHECKPOINT)), rd.load_checkpoint(str(out / rd.CHECKPOINT))
    for name, tensor in a["learner"].items():
        assert torch.equal(tensor, b["learner"][name]), name
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def _limit_file_size(limit):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


@pytest.mark.slow
def test_file_size_limit_during_checkpoint_write(data_root, tmp_path):
    out = tmp_path / "run"
    proc = cli(_train_args(data_root, out, epochs=1), preexec_fn=_limit_file_size(64 * 1024))
    line = one_line_error(proc)
    assert "File too large" in line and "checkpoint.pt" in line, line
    assert tmp_leftovers(out) == []
    assert not (out / "metrics.json").exists() and not (out / rd.CHECKPOINT).exists()


def _read_only(folder):
    """Run the child in its own mount namespace with ``folder`` bind-mounted read-only."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not available")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {folder} {folder} && "
                            f"mount -o remount,ro,bind {folder} {folder}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {probe.stderr.decode().strip()}")
    return ["unshare", "-m", "sh", "-c", f'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"',
            str(folder)]


@pytest.mark.slow
def test_read_only_output_file_system(data_root, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = cli(_train_args(data_root, ro / "run", epochs=1), wrap=_read_only(ro))
    line = one_line_error(proc)
    assert "Read-only file system" in line, line


@pytest.mark.slow
def test_read_only_dataset_root_with_split_fewshot_falls_back(tmp_path):
    root = tmp_path / "ro-data"
    write_synthetic_coop_dataset(str(root), num_classes=4, images_per_class=6, image_size=32, seed=0)
    (root / "split_fewshot").mkdir()
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    args = _train_args(str(root), out, epochs=1)
    env_cache = ["env", f"XDG_CACHE_HOME={cache}"]
    proc = cli(args, wrap=_read_only(root) + env_cache)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert str(cache / "drople_fast" / "split_fewshot") in err.decode()
    assert any(cache.rglob("*.json")) and not any((root / "split_fewshot").iterdir())
    assert (out / "metrics.json").exists()


def test_eval_refuses_a_config_that_does_not_describe_the_checkpoint(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    saved = json.loads((run / "config.json").read_text())
    saved["lora_rank"] = 3  # config.json of another run beside this checkpoint
    (run / "config.json").write_text(json.dumps(saved))
    assert_main_error(capsys, ["eval", str(run), "--no-progress", "--device", "cpu"], "lora_rank: 8 -> 3")


@pytest.mark.parametrize("content,fragment", [("{", "not valid JSON"), ("[]", "expected a JSON object"),
                                              ('{"dataset": "Synthetic"}', "missing key")])
def test_poisoned_metrics_json_of_a_finished_run(finished, tmp_path, content, fragment):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "metrics.json").write_text(content)
    saved = json.loads((run / "config.json").read_text())
    saved.update(resume=True, output_dir=str(run))
    with pytest.raises(ValueError, match=fragment):
        train(TrainConfig.from_dict(saved))
    assert (run / "metrics.json").read_text() == content  # reported, never silently overwritten


@pytest.mark.slow
def test_two_concurrent_cli_writers(data_root, tmp_path):
    out = tmp_path / "run"
    first = cli(_train_args(data_root, out, epochs=60) + ["--resume"])  # long enough to overlap
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not (out / "fingerprint.json").exists():
        time.sleep(0.01)
    second = cli(_train_args(data_root, out, epochs=60) + ["--resume"])
    line = one_line_error(second)
    assert "in use by another drople-fast process" in line and f"pid {first.pid}" in line, line
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err.decode()[-2000:]
    assert (out / "metrics.json").exists() and rd.load_checkpoint(str(out / rd.CHECKPOINT))["epoch"] == 60
