"""IWTD backends: which exist, what they support, and why one refuses an input.

Every backend implements the same fused signature::

    fn(q, k, hidden, eligible, valid, anchor, folded, shift, causal, p_min, p_max, seed, row_stride=0)
      -> (importance, drop_prob, drop_mask, keep_count, keep_order)

with ``eligible``/``valid`` bool (B, S), ``anchor`` int64 (B,), the folded
bridge ``folded`` float32 (M, D) and ``shift`` float32 (M,), ``seed`` an
int64 tensor of shape (1,) on the input device, and ``row_stride`` the Philox
offset between samples (token j of sample b draws at ``b * row_stride + j``;
0 means S, see docs/design.md §4). ``keep_order`` is (B, S) int64: kept
positions first in original order, then -1.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _reference_fn():
    from .reference import iwtd_reference

    return iwtd_reference


def _cpp_fn():
    from . import library  # registers the fake implementation

    library.load_cpp_extension()
    return torch.ops.drople_fast.iwtd_cpu


def _triton_fn():
    from ..kernels import iwtd_triton

    return iwtd_triton.iwtd_triton_op


def _cpp_unavailable() -> Optional[str]:
    from . import library

    return library.cpp_extension_error()


def _version(dist: str) -> Optional[tuple[int, int]]:
    """(major, minor) of an installed distribution, None if it is not installed."""
    try:
        match = re.match(r"(\d+)\.(\d+)", importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        return None
    return (int(match.group(1)), int(match.group(2))) if match else None


def _triton_install_problem() -> tuple[Optional[str], Optional[str]]:
    """(why triton cannot run at all, why its CPU interpreter cannot run), decided once at import.

    At import, not per call: ``iwtd`` picks its backend inside ``torch.compile`` traces, and torch 2.11's
    dynamo refuses to trace ``importlib.util.find_spec``; what stays per call (the interpreter flag and
    ``torch.cuda.is_available``) is what dynamo traces on every supported torch.
    """
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed", None
    triton_v, numpy_v = _version("triton"), _version("numpy")
    # triton < 3.7's interpreter calls int() on 1-element arrays, which numpy >= 2.4 refuses (every kernel fails
    # with "only 0-dimensional arrays can be converted to Python scalars"); triton 3.7 fixed it.
    if triton_v is not None and triton_v < (3, 7) and numpy_v is not None and numpy_v >= (2, 4):
        return None, (f"the interpreter of triton {'.'.join(map(str, triton_v))} fails with numpy "
                      f"{'.'.join(map(str, numpy_v))} (install numpy<2.4 or triton>=3.7)")
    return None, None


_TRITON_MISSING, _TRITON_INTERPRETER_BROKEN = _triton_install_problem()


def _triton_unavailable() -> Optional[str]:
    if _TRITON_MISSING:
        return _TRITON_MISSING
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpreting and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run it on the CPU interpreter)"
    if interpreting and _TRITON_INTERPRETER_BROKEN:
        return _TRITON_INTERPRETER_BROKEN
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    load: Callable[[], Callable]
    unavailable: Callable[[], Optional[str]] = lambda: None
    note: str = ""

    def why_not(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None if this backend can run on ``device``/``dtype``, else the reason it refuses."""
        reason = self.unavailable()
        if reason:
            return reason
        if device.type not in self.devices:
            return f"runs on {'/'.join(self.devices)}, not {device.type}"
        if dtype not in self.dtypes:
            return f"supports {', '.join(str(d) for d in self.dtypes)}, not {dtype}"
        return None


def _triton_devices() -> tuple[str, ...]:
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


BACKENDS: dict[str, Backend] = {
    "reference": Backend(
        "reference", ("cpu", "cuda"), FLOAT_DTYPES, _reference_fn,
        note="plain PyTorch, materialises the attention map (the test oracle)",
    ),
    "cpp": Backend(
        "cpp", ("cpu",), FLOAT_DTYPES, _cpp_fn, _cpp_unavailable,
        note="fused C++ CPU operator (drople_fast._C), parallel over the batch",
    ),
    "triton": Backend(
        "triton", _triton_devices(), FLOAT_DTYPES, _triton_fn, _triton_unavailable,
        note="Triton: scores, bridge GEMM and epilogue kernels, three deterministic launches per layer",
    ),
}

# Preference order when the caller does not choose.
_PREFERENCE = {"cuda": ("triton", "reference"), "cpu": ("cpp", "reference")}


def select_backend(name: Optional[str], device: torch.device, dtype: torch.dtype) -> Callable:
    """The fused function for ``name`` (or the best usable one); ValueError with the reason otherwise."""
    if name is None:
        for candidate in _PREFERENCE.get(device.type, ("reference",)):
            if BACKENDS[candidate].why_not(device, dtype) is None:
                return BACKENDS[candidate].load()
        raise ValueError(f"no IWTD backend supports device={device.type} dtype={dtype}")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)} or None, got {name!r}")
    reason = BACKENDS[name].why_not(device, dtype)
    if reason:
        raise ValueError(f"IWTD backend {name!r} cannot run here: {reason}")
    return BACKENDS[name].load()


def describe() -> list[tuple[str, str]]:
    """(backend, 'usable' or the reason not) on the CPU and, if present, on CUDA."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for backend in BACKENDS.values():
        for device in devices:
            reason = backend.why_not(device, torch.float32)
            rows.append((f"{backend.name} [{device.type}]", "usable" if reason is None else f"unavailable: {reason}"))
    return rows
