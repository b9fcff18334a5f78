"""Numeric precision of training and evaluation: the one home for ``precision -> autocast``.

``TrainConfig.precision`` / ``--precision``:

* ``auto``: bf16 autocast on CUDA, fp32 on the CPU (so CPU results do not depend on whether the CPU
  has bf16 matrix units unless bf16 is asked for);
* ``fp32``: no autocast;
* ``bf16``: ``torch.autocast(device, dtype=torch.bfloat16)`` on CUDA and on the CPU (fast on CPUs with
  AMX / AVX512-BF16, see :func:`cpu_bf16_hardware` and ``python -m drople_fast.info``);
* ``fp16``: ``torch.autocast(device, dtype=torch.float16)`` with a :class:`torch.amp.GradScaler` (fp16's
  5-bit exponent underflows small gradients; the scaler's state is saved in checkpoints).

The choice is part of the run fingerprint (a config field); the resolved precision is also recorded
with the checkpoint's execution facts, so resuming an ``auto`` run on another device type is refused.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Iterable, Optional, Tuple

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags of CPUs with bf16 matrix / dot-product instructions (Sapphire Rapids' AMX tiles,
# Cooper Lake / Zen 4's AVX512-BF16); oneDNN uses them for bf16 matmuls under CPU autocast.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def check_precision(precision) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere; any other value as it is."""
    check_precision(precision)
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """The autocast context of ``precision`` on ``device`` (disabled for fp32)."""
    resolved = resolve_precision(precision, device)
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=_DTYPES.get(resolved, torch.bfloat16),
                          enabled=resolved != "fp32")


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler, enabled for fp16 only (a disabled one is a no-op: bf16 and fp32 steps are unchanged)."""
    resolved = resolve_precision(precision, device)
    return torch.amp.GradScaler(torch.device(device).type, enabled=resolved == "fp16")


def _cpuinfo() -> str:
    """``/proc/cpuinfo``'s text ("" where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def cpu_flags(cpuinfo: Optional[str] = None) -> Tuple[str, ...]:
    """The CPU's feature flags from ``/proc/cpuinfo`` text (read from the file if not given; () if unreadable)."""
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return tuple(value.split())
    return ()


def cpu_bf16_hardware(flags: Iterable[str]) -> Tuple[str, ...]:
    """Which of :data:`BF16_CPU_FLAGS` ``flags`` has (empty: bf16 on this CPU is emulated and slow)."""
    have = set(flags)
    return tuple(f for f in BF16_CPU_FLAGS if f in have)


def device_label(device: torch.device, cpuinfo: Optional[str] = None) -> str:
    """What a run trained on, for reports: the CUDA device's name, or the CPU's model name and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model(cpuinfo)} ({os.cpu_count()} cores)"


def cpu_model(cpuinfo: Optional[str] = None) -> str:
    """The CPU's model name from ``/proc/cpuinfo`` text (read from the file if not given), else the machine type.

    The x86 family and model numbers follow the name: a virtual machine's name can be as bare as
    "AMD EPYC", and the generation behind it decides what bf16 is worth (this project's machines, with
    the same flags: bf16 GEMMs ~2.2x fp32 on one, ~4.5x on family 26, Zen 5).
    """
    fields: dict = {}
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.machine() or "CPU"
    if fields.get("cpu family") and fields.get("model"):
        name += f", family {fields['cpu family']} model {fields['model']}"
    return name


def gemm_gflops(device: torch.device, rows: int = 4211, repeats: int = 7) -> dict:
    """Measured ``F.linear`` throughput in GFLOP/s (fastest of ``repeats``), ``{"float32": .., "bfloat16": ..}``,
    at the text tower's MLP shape (rows, 512) x (512, 2048) (4,211: its valid tokens at 500 classes).

    What bf16 autocast can win on this device: CPUs with the same bf16 flags differ 2x here.
    """
    device = torch.device(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, 512, device=device, dtype=dtype)
        w = torch.randn(2048, 512, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            sync()
            best = min(best, time.perf_counter() - start)
        rates[str(dtype).removeprefix("torch.")] = round(2 * rows * 512 * 2048 / best / 1e9, 1)
    return rates


def cpu_bf16_summary(flags: Optional[Iterable[str]] = None) -> str:
    """The CPU's bf16 matrix / dot-product extensions as one phrase, for benchmark records."""
    return " ".join(cpu_bf16_hardware(cpu_flags() if flags is None else flags)) or "no bf16 extensions"
