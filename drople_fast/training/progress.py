"""Progress bars for long work (training, evaluation, the demo's pre-training).

tqdm, live on a terminal or in a notebook. Where stderr is not a terminal (a log file, CI, ``nohup``)
the bar is redrawn at most every :data:`LOG_INTERVAL_S` seconds, so a captured run's log holds a few
progress lines a minute instead of one per tenth of a second; its last state is always written.
"""
from __future__ import annotations

import sys

LOG_INTERVAL_S = 30.0


def _interactive(stream) -> bool:
    if "ipykernel" in sys.modules:  # a notebook: tqdm.auto draws a widget
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, off unless ``enabled``, throttled where stderr (or
    ``file=``) is not a terminal."""
    from tqdm.auto import tqdm

    if not _interactive(kwargs.get("file") or sys.stderr):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.pop("dynamic_ncols", None)  # no terminal to measure
    return tqdm(iterable, disable=not enabled, **kwargs)
