"""The training loop's conventions: per-step progress (loss, img/s), the start-up summary, the per-step CSV
log (every loss term and the learning rate), TensorBoard events when torch.utils.tensorboard imports, and
progress bars that stay sparse in a log."""
import csv
import io
import json
import sys
import time
import types

import pytest

from drople_fast.training import trainer
from drople_fast.training.data import write_synthetic_coop_dataset
from drople_fast.training.run_log import CSV_LOG, CSVLogger, open_run_loggers
from run_config import tiny_run_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    write_synthetic_coop_dataset(root, num_classes=4, images_per_class=8, seed=0)
    return root


def read_log(run):
    with open(run / CSV_LOG, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_log_has_every_step_term_and_lr(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tiny_run_config(data_root, run, epochs=2, progress=True)
    trainer.train(cfg)
    captured = capsys.readouterr()
    history = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    rows = read_log(run)
    steps = 2  # 2 base classes x 2 shots / batch 2
    assert [int(r["global_step"]) for r in rows] == list(range(1, 2 * steps + 1))
    assert [(int(r["epoch"]), int(r["step"])) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    terms = [k for k in history[0] if k.startswith("loss_")]
    assert len(terms) >= 5 and set(terms) <= set(rows[0]) and {"loss", "lr", "lr_lora", "images_per_s"} <= set(rows[0])
    for epoch, record in enumerate(history, 1):
        mine = [r for r in rows if int(r["epoch"]) == epoch]
        # the epoch's mean of the logged per-step values is the epoch record: the same floats, summed in order
        for key in ["loss"] + terms:
            assert sum(float(r[key]) for r in mine) / len(mine) == record[key], key
        assert all(float(r["images_per_s"]) > 0 for r in mine)
    assert float(rows[-1]["lr"]) == history[1]["lr"]  # no scheduler step inside epoch 2
    assert float(rows[-1]["lr_lora"]) == pytest.approx(history[1]["lr"] * cfg.lora_lr / cfg.lr)  # one schedule
    # progress: per step (not per epoch), with the loss and the throughput
    assert "4/4" in captured.err and "img/s" in captured.err and "loss" in captured.err
    assert "epoch 2" in captured.err
    # the start-up summary: classes, images, trainable parameters
    assert "Synthetic (base2novel, 2 shots, seed 1): 2 training classes, 4 training images" in captured.out
    assert "trainable parameters " in captured.out and f"per-step log {run / CSV_LOG}" in captured.out


def test_summary_counts_every_trainable_parameter(data_root, tmp_path):
    from drople_fast.training.build import build_clip, build_training, make_plan

    cfg = tiny_run_config(data_root, tmp_path / "run")
    plan = make_plan(cfg)
    setup = build_training(cfg, plan, build_clip("tiny"), trainer.resolve_device("cpu"))
    counts = trainer.parameter_counts(setup.learner)
    assert sum(counts.values()) == sum(p.numel() for _, p in setup.learner.trainable_named_parameters())
    assert counts["LoRA"] == 6 * 4 * 8 * 64 and counts["logit scale"] == 1 and counts["bridge"] > 0
    text = trainer.startup_summary(cfg, plan, setup.learner, trainer.resolve_device("cpu"), 2, ["per-step log x"])
    assert f"trainable parameters {sum(counts.values()):,} (prompts {counts['prompts']:,}, LoRA 12,288" in text
    assert len(text.splitlines()) == 3


def test_failed_run_leaves_no_log(data_root, tmp_path, monkeypatch):
    def diverge(learner, epoch):
        raise trainer.NonFiniteError("training diverged: simulated")

    monkeypatch.setattr(trainer, "check_finite_weights", diverge)
    run = tmp_path / "run"
    with pytest.raises(trainer.NonFiniteError):
        trainer.train(tiny_run_config(data_root, run))
    assert not run.exists()  # the CSV written during epoch 1 went with the rest


def test_resumed_csv_keeps_the_checkpointed_epochs(tmp_path):
    path = tmp_path / CSV_LOG
    first = CSVLogger(str(path))
    for epoch, step in ((1, 1), (1, 2), (2, 1)):  # epoch 2 was interrupted before its checkpoint
        first.log_step({"epoch": epoch, "step": step, "global_step": 2 * (epoch - 1) + step, "loss": 0.5 * step})
    first.close()
    again = CSVLogger(str(path), keep_epochs=1)
    again.log_step({"epoch": 2, "step": 1, "global_step": 3, "loss": 9.0})
    again.close()
    assert [(r["epoch"], r["step"], r["loss"]) for r in read_log(tmp_path)] == [("1", "1", "0.5"), ("1", "2", "1.0"),
                                                                              ("2", "1", "9.0")]
    fresh = CSVLogger(str(path))  # keep_epochs 0: a new run starts the file afresh
    fresh.log_step({"epoch": 1, "step": 1, "global_step": 1, "loss": 2.0})
    fresh.close()
    assert len(read_log(tmp_path)) == 1
    with pytest.raises(ValueError, match="not columns"):
        fresh = CSVLogger(str(path), keep_epochs=1)
        fresh.log_step({"epoch": 1, "step": 1, "global_step": 1, "loss": 2.0})
        fresh.log_step({"epoch": 1, "step": 2, "global_step": 2, "loss": 2.0, "new_term": 1.0})


class FakeSummaryWriter:
    made = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeSummaryWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_gets_every_column_per_step(tmp_path, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeSummaryWriter.made.clear()
    logger, notes = open_run_loggers(str(tmp_path), keep_epochs=2, steps_per_epoch=5)
    assert notes == [f"per-step log {tmp_path / CSV_LOG}", f"TensorBoard {tmp_path / 'tensorboard'}"]
    logger.log_step({"epoch": 3, "step": 1, "global_step": 11, "lr": 1e-3, "loss": 2.5, "loss_ce": 1.0})
    logger.close()
    (writer,) = FakeSummaryWriter.made
    assert writer.purge_step == 11 and writer.closed  # a resumed run drops events from its first new step
    assert writer.scalars == [("train/lr", 1e-3, 11), ("train/loss", 2.5, 11), ("train/loss_ce", 1.0, 11)]
    logger, notes = open_run_loggers(str(tmp_path / "off"), tensorboard=False)
    assert len(notes) == 1 and len(logger.loggers) == 1


def test_tensorboard_missing_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    logger, notes = open_run_loggers(str(tmp_path))
    assert len(logger.loggers) == 1 and notes[1].startswith("TensorBoard skipped:") and "pip install tensorboard" in notes[1]


def test_real_tensorboard_events(tmp_path):
    pytest.importorskip("torch.utils.tensorboard", reason="the tensorboard package is not installed")
    logger, notes = open_run_loggers(str(tmp_path))
    logger.log_step({"epoch": 1, "step": 1, "global_step": 1, "loss": 1.5})
    logger.close()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bar_is_live_on_a_terminal_and_sparse_in_a_log(terminal):
    """A log (stderr not a terminal) gets the bar's start and its final state, not a redraw every tenth
    of a second; a terminal gets the live bar."""
    from drople_fast.training.progress import progress_bar

    stream = _Terminal() if terminal else io.StringIO()
    for _ in progress_bar(range(12), desc="work", file=stream):
        time.sleep(0.05)
    draws = stream.getvalue().count("\r")
    assert "12/12" in stream.getvalue()
    if terminal:
        assert draws >= 5, stream.getvalue()  # ~0.6 s of work at tqdm's 0.1 s interval
    else:
        assert draws <= 2, stream.getvalue()  # the first draw and the final one
    assert progress_bar(range(3), enabled=False, file=stream).disable
