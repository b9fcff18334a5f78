"""The run directory: what a training run writes, and the checks that make it safe to reuse.

Files, in the order they appear::

    .lock              fcntl lock held by the one process writing the run (holds its pid)
    config.json        the resolved TrainConfig (``drople-fast eval`` reads it)
    fingerprint.json   everything that changes the numbers: the config (minus fields that
                       do not: paths, progress bars, eval batch size ...), a SHA-256 of the
                       data split (train and test records, class names) and the package version
    checkpoint.pt      after every epoch (learner, patch counters, optimizer, scheduler, RNG
                       states, history, the fingerprint, the thread / worker counts)
    checkpoint.pt.sha256  SHA-256 of checkpoint.pt, verified before every load
    metrics.jsonl      one line per finished epoch (rewritten from the checkpoint's history)
    results.md         the evaluation table
    metrics.json       the final metrics, written last: a run without it is not finished

Contract:

* **Locked.** One writer per directory: a second process is refused with a
  one-line error naming the holder's pid. The OS releases the lock when the
  process dies, so a SIGKILL never leaves a stale lock.
* **Fingerprinted.** A finished run is reused, and an unfinished one resumed,
  only when its fingerprint equals the current one; otherwise the error names
  every differing field.
* **Verified.** A checkpoint whose SHA-256 does not match its sidecar, or that
  lacks a field, is refused with the reason.
* **Cleaned up.** Every write is atomic (:mod:`.fileio`): leftover
  ``*.tmp<pid>`` files of a killed run are removed when the next run takes the
  lock, and a run that fails before its first checkpoint removes the files it
  wrote and the directory if it created it -- never anything else.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
from typing import Any, Dict, List, Sequence

import torch

from .fileio import atomic_json, atomic_text, atomic_write_bytes, read_json_object, remove_stale_tmp

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "drople_fast-checkpoint-v2"
CHECKSUM_SUFFIX = ".sha256"
CONFIG = "config.json"
FINGERPRINT = "fingerprint.json"
METRICS = "metrics.json"
HISTORY = "metrics.jsonl"
RESULTS = "results.md"
LOCK = ".lock"
CHECKPOINT_KEYS = ("format", "epoch", "config", "fingerprint", "learner", "patch", "optimizer", "scheduler", "rng",
                   "history", "execution")
# TrainConfig fields that do not change the numbers (so they are not fingerprinted).
NOT_FINGERPRINTED = frozenset({"resume", "progress", "output_dir", "device", "eval_batch_size", "root",
                               "fewshot_cache", "num_workers", "num_threads", "dataset_dir", "tensorboard"})

# TrainConfig fields added after runs were written, with their defaults: at the default they are left out of the
# fingerprint, so those runs still match (resume, reuse, eval) a config that has the field.
ADDED_FIELDS = {"split_file": None, "image_dir": None, "template": None, "allow_fewer": False}


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (locked, mismatched, damaged)."""


# --------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------


def data_fingerprint(plan, root: str) -> str:
    """SHA-256 over the plan's train and test records (paths relative to ``root``) and class lists."""
    h = hashlib.sha256()

    def add(*parts):
        h.update(("\x1f".join(str(p) for p in parts) + "\x1e").encode("utf-8"))

    add("protocol", plan.protocol, plan.dataset)
    add("train", *plan.train_classnames)
    for r in plan.train_records:
        add(os.path.relpath(r.path, root), r.label)
    for split in plan.evals:
        add("eval", split.name, split.dataset, *split.classnames)
        for r in split.records:
            add(os.path.relpath(r.path, root), r.label)
    return h.hexdigest()


def fingerprint(config: Dict, plan, root: str) -> Dict:
    """The run's fingerprint; ``plan`` None leaves the data part out (checking a config alone)."""
    from .. import __version__

    return {"config": {k: v for k, v in config.items() if k not in NOT_FINGERPRINTED
                       and not (k in ADDED_FIELDS and v == ADDED_FIELDS[k])},
            "data": None if plan is None else data_fingerprint(plan, root), "version": __version__}


def flatten_fields(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten_fields(v, name) if isinstance(v, dict) else {name: v})
    return out


def fingerprint_diff(saved: Dict, now: Dict) -> List[str]:
    """``"field: old -> new"`` for every differing field (``config.`` prefix dropped)."""
    a, b = flatten_fields(saved), flatten_fields(now)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            name = key[len("config."):] if key.startswith("config.") else key
            out.append(f"{name}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


# --------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(path: str, payload: Dict) -> None:
    """Atomic ``torch.save`` with its SHA-256 sidecar.

    The sidecar is written first and names both the new and the previous
    checkpoint's hash, so a crash between the two renames leaves a pair that
    still verifies (the previous checkpoint, listed as ``previous``).
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    blob = buffer.getvalue()
    new = hashlib.sha256(blob).hexdigest()
    sidecar = path + CHECKSUM_SUFFIX
    previous = None
    if os.path.isfile(path) and os.path.isfile(sidecar):
        try:
            previous = read_json_object(sidecar, "checkpoint checksum").get("sha256")
        except ValueError:
            previous = None
    atomic_json(sidecar, {"file": os.path.basename(path), "sha256": new, "previous": previous})
    atomic_write_bytes(path, blob)
    atomic_json(sidecar, {"file": os.path.basename(path), "sha256": new, "previous": None})


def verify_checkpoint(path: str) -> None:
    sidecar = path + CHECKSUM_SUFFIX
    if not os.path.isfile(sidecar):
        raise RunDirError(f"checkpoint {path} has no checksum file {sidecar}: cannot verify it")
    manifest = read_json_object(sidecar, "checkpoint checksum")
    actual = sha256_of(path)
    if actual not in (manifest.get("sha256"), manifest.get("previous")):
        raise RunDirError(f"checkpoint {path} is damaged: its SHA-256 {actual[:16]}... does not match "
                          f"{sidecar} ({str(manifest.get('sha256'))[:16]}...)")


def load_checkpoint(path: str) -> Dict:
    """Read a run checkpoint after verifying its SHA-256; missing, damaged, foreign or incomplete files
    are a clear error naming the file (and the missing field)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    verify_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise RunDirError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})".splitlines()[0]) \
            from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RunDirError(f"{path} is not a drople_fast run checkpoint (format {CHECKPOINT_FORMAT})")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise RunDirError(f"checkpoint {path} lacks field(s) {missing}")
    if isinstance(ckpt["epoch"], bool) or not isinstance(ckpt["epoch"], int) or ckpt["epoch"] < 1:
        raise RunDirError(f"checkpoint {path}: epoch must be an int >= 1, got {ckpt['epoch']!r}")
    return ckpt


# --------------------------------------------------------------------------
# the directory
# --------------------------------------------------------------------------


class RunDir:
    """One run directory, held under an exclusive lock from :meth:`open` to :meth:`close`."""

    def __init__(self, path: str):
        self.path = path
        self.created = False
        self.written: List[str] = []
        self._lock_file = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def checkpoint_path(self) -> str:
        return self.file(CHECKPOINT)

    def has(self, name: str) -> bool:
        return os.path.isfile(self.file(name))

    # ---- lock -----------------------------------------------------------

    def open(self) -> "RunDir":
        """Create the directory if needed, take its lock, remove stale temporary files."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunDirError(f"output directory {self.path} exists and is not a directory")
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        try:
            os.mkdir(self.path)
            self.created = True
        except FileExistsError:
            if not os.path.isdir(self.path):
                raise RunDirError(f"output directory {self.path} exists and is not a directory") from None
        lock_path = self.file(LOCK)
        f = open(lock_path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                f.close()
                raise
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            self.created = False  # the holder uses it: never ours to remove
            raise RunDirError(f"run directory {self.path} is in use by another drople-fast process (pid {holder}); "
                              "wait for it to finish or pick another --output-dir") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock_file = f
        remove_stale_tmp(self.path)
        return self

    def close(self, failed: bool = False) -> None:
        """Release the lock. After a failure before the first checkpoint, remove what this run wrote
        (and the directory, if this process created it and nothing else is in it)."""
        if self._lock_file is None:
            return
        try:
            if failed and not self.has(CHECKPOINT):
                remove_stale_tmp(self.path)
                for path in self.written:
                    try:
                        os.remove(path)
                    except OSError:
                        pass
                if self.created:
                    try:
                        os.remove(self.file(LOCK))
                        os.rmdir(self.path)
                    except OSError:
                        pass
        finally:
            self._lock_file.close()
            self._lock_file = None

    # ---- state ----------------------------------------------------------

    def check_fingerprint(self, now: Dict) -> None:
        """Refuse a directory that holds a run with another fingerprint (naming the differing fields)."""
        if not any(self.has(n) for n in (CHECKPOINT, METRICS, CONFIG, FINGERPRINT)):
            return
        if not self.has(FINGERPRINT):
            raise RunDirError(f"{self.path} holds a run without {FINGERPRINT} (an older drople_fast?): "
                              "cannot tell whether it matches; pick another --output-dir")
        saved = read_json_object(self.file(FINGERPRINT), "run fingerprint")
        diff = fingerprint_diff(saved, now)
        if diff:
            raise RunDirError(f"{self.path} holds a run with another configuration ({'; '.join(diff[:6])}"
                              f"{'; ...' if len(diff) > 6 else ''}); pick another --output-dir")

    def start(self, config: Dict, fp: Dict) -> None:
        for name, payload in ((CONFIG, config), (FINGERPRINT, fp)):
            existed = self.has(name)
            atomic_json(self.file(name), payload)
            if not existed:
                self.written.append(self.file(name))

    def save_checkpoint(self, payload: Dict) -> None:
        save_checkpoint(self.checkpoint_path, payload)

    def write_history(self, history: Sequence[Dict]) -> None:
        import json

        atomic_text(self.file(HISTORY), "".join(json.dumps(h) + "\n" for h in history))

    def write_results(self, table: str) -> None:
        atomic_text(self.file(RESULTS), table)

    def write_metrics(self, metrics: Dict) -> None:
        atomic_json(self.file(METRICS), metrics)
