"""The one home of file reading and writing for runs: JSON with errors that name the file, atomic writes.

Every file a run writes goes through :func:`atomic_write`: the bytes are
written to ``<path>.tmp<pid>`` in the same folder, flushed and fsynced, then
``os.replace``-d over ``path``, so a reader (or a crash) sees the old file or
the new one, never half of one. A failed write (disk full, file-size limit,
read-only file system) removes its temporary file and raises ``OSError``
naming the path; :func:`remove_stale_tmp` removes the ones a killed process
left behind.
"""
from __future__ import annotations

import io
import json
import os
import re
from typing import Any, Callable, List

_TMP = re.compile(r"\.tmp\d+$")


def read_json(path: str, what: str = "JSON file") -> Any:
    """Parsed contents of ``path``; FileNotFoundError / ValueError naming ``what`` and the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}") from exc


def read_json_object(path: str, what: str = "JSON file") -> dict:
    """:func:`read_json` that also requires a JSON object (``{...}``)."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, got a {type(data).__name__}")
    return data


def tmp_path(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (tmp + fsync + ``os.replace``); no tmp file survives a failure."""
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not exc.filename:
            raise OSError(exc.errno, exc.strerror, path) from exc
        raise


def atomic_write(path: str, write: Callable[[io.BytesIO], None]) -> bytes:
    """Serialise with ``write(buffer)`` in memory first, then :func:`atomic_write_bytes`; returns the bytes.

    Serialising first means a serialiser's own error reporting (``torch.save`` raises
    ``RuntimeError: unexpected pos`` on a full disk) never meets the file system.
    """
    buffer = io.BytesIO()
    write(buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return data


def atomic_json(path: str, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, allow_nan=False) + "\n").encode("utf-8"))


def atomic_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_tmp(folder: str) -> List[str]:
    """Remove ``*.tmp<pid>`` files in ``folder`` (not recursive); the caller must hold the folder's lock."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        if _TMP.search(name):
            path = os.path.join(folder, name)
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    return removed
