"""Per-step training logs: a :class:`RunLogger` interface, a CSV log (always) and TensorBoard events
(when ``torch.utils.tensorboard`` imports, i.e. the ``tensorboard`` package is installed).

Every optimiser step logs one row: ``epoch`` (1-based), ``step`` (1-based within the epoch),
``global_step`` (1-based over the run), ``lr`` (the prompts' group) and ``lr_lora`` (LoRA's, when
LoRA is on), ``loss`` (the total) and every loss term as ``loss_<term>``, and ``images_per_s`` (the
step's images over its wall time, data loading included). The values are the ones the epoch loop
already copies to the host for its running sums: logging adds no device synchronisation.

A resumed run keeps the rows of the epochs its checkpoint holds and drops the later ones (written
after the checkpoint by the interrupted process), so the log of a resumed run is the log of an
uninterrupted one, timings aside. TensorBoard's ``purge_step`` does the same for its events.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

from .fileio import atomic_text

CSV_LOG = "train_log.csv"
TENSORBOARD_DIR = "tensorboard"
# the leading columns, in this order; the loss terms follow in the order the learner returns them
INDEX_COLUMNS = ("epoch", "step", "global_step")


class RunLogger:
    """Receives one ``values`` dict per optimiser step (:data:`INDEX_COLUMNS` plus floats)."""

    def log_step(self, values: Dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release the files (the logs stay)."""

    def discard(self) -> None:
        """Close and remove what this logger created (a run that failed before its first checkpoint
        leaves nothing behind)."""
        self.close()


class CSVLogger(RunLogger):
    """``path``: one header line, then a row per step, flushed every step (``tail -f`` follows it).

    ``keep_epochs``: rows of epochs <= it already in the file are kept (a resumed run), later ones
    dropped; 0 starts the file afresh."""

    def __init__(self, path: str, keep_epochs: int = 0):
        self.path = path
        self.created = not os.path.exists(path)
        self._kept: List[Dict[str, str]] = []
        self._columns: List[str] = []
        if keep_epochs > 0 and not self.created:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self._columns = list(reader.fieldnames or [])
                self._kept = [row for row in reader if _int(row.get("epoch")) <= keep_epochs]
        self._file: Optional[io.TextIOBase] = None
        self._writer = None

    def _open(self, values: Dict[str, float]) -> None:
        columns = list(self._columns) + [k for k in values if k not in self._columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self._kept)
        atomic_text(self.path, buffer.getvalue())  # the kept rows, whole, before appending
        self._columns, self._kept = columns, []
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=columns, restval="", lineterminator="\n")

    def log_step(self, values: Dict[str, float]) -> None:
        if self._writer is None:
            self._open(values)
        extra = [k for k in values if k not in self._columns]
        if extra:
            raise ValueError(f"{self.path}: step values {extra} are not columns of the log {self._columns}")
        self._writer.writerow({k: _format(v) for k, v in values.items()})
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._writer = None

    def discard(self) -> None:
        self.close()
        if self.created:
            try:
                os.remove(self.path)
            except OSError:
                pass


class TensorBoardLogger(RunLogger):
    """Scalars ``train/<column>`` at ``global_step`` in ``log_dir``; ``purge_step`` drops events from
    that step on (a resumed run's first step)."""

    def __init__(self, log_dir: str, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.created = not os.path.exists(log_dir)
        self._writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def log_step(self, values: Dict[str, float]) -> None:
        step = int(values["global_step"])
        for key, value in values.items():
            if key not in INDEX_COLUMNS:
                self._writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def discard(self) -> None:
        self.close()
        if self.created:
            shutil.rmtree(self.log_dir, ignore_errors=True)


class MultiLogger(RunLogger):
    def __init__(self, loggers: Sequence[RunLogger]):
        self.loggers = list(loggers)

    def log_step(self, values: Dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log_step(values)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()

    def discard(self) -> None:
        for logger in self.loggers:
            logger.discard()


def tensorboard_unavailable() -> Optional[str]:
    """None when ``torch.utils.tensorboard`` imports, else why not (one line)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError as exc:  # torch's module imports the separate tensorboard package
        return f"{exc} (pip install tensorboard)"
    return None


def open_run_loggers(run_dir: str, keep_epochs: int = 0, steps_per_epoch: int = 0,
                     tensorboard: bool = True) -> Tuple[MultiLogger, List[str]]:
    """The run's loggers and one line per destination for the start-up summary: the CSV log always;
    TensorBoard when asked for and importable (else the line says why it is skipped)."""
    csv_path = os.path.join(run_dir, CSV_LOG)
    loggers: List[RunLogger] = [CSVLogger(csv_path, keep_epochs)]
    notes = [f"per-step log {csv_path}"]
    if tensorboard:
        reason = tensorboard_unavailable()
        if reason is None:
            log_dir = os.path.join(run_dir, TENSORBOARD_DIR)
            loggers.append(TensorBoardLogger(log_dir, purge_step=keep_epochs * steps_per_epoch + 1
                                             if keep_epochs else None))
            notes.append(f"TensorBoard {log_dir}")
        else:
            notes.append(f"TensorBoard skipped: {reason}")
    return MultiLogger(loggers), notes


def _format(value) -> str:
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return str(value)


def _int(text: Optional[str]) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0
