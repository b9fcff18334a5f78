"""Triton kernels of drople_fast.

This package must import without Triton: nothing here imports ``triton``.
The kernel modules (e.g. :mod:`drople_fast.ops.kernels.iwtd_triton`) are loaded
lazily by :mod:`drople_fast.ops.backends` only once it has checked that Triton and
a device it can run on (CUDA, or the CPU interpreter via ``TRITON_INTERPRET=1``,
which must be set before Triton is first imported) are available.
"""
from __future__ import annotations

import importlib.util

__all__ = ["triton_available"]


def triton_available() -> bool:
    """True if the ``triton`` package is installed (whether it can run here is for backends.py to say)."""
    return importlib.util.find_spec("triton") is not None
