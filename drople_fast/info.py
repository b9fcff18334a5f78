"""``python -m drople_fast.info``: versions, and which backends are usable here and why not."""
from __future__ import annotations

import importlib.metadata
import platform
from typing import Optional

import torch


def _version(distribution: str) -> str:
    # Read the installed metadata: importing xformers just to print its version is slow and noisy.
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> list[tuple[str, str]]:
    from .clip.attention import xformers_unavailable
    from .ops.backends import describe
    from .training.precision import device_label, gemm_gflops

    from . import __version__

    rows = [
        ("drople_fast", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"),
        ("triton", _version("triton")),
        ("xformers", _version("xformers")),
        ("open_clip", _version("open_clip_torch")),
    ]
    rows += [(f"iwtd backend {name}", status) for name, status in describe()]
    from .ops.library import REBUILD_COMMAND, cpp_extension_error

    if cpp_extension_error() is not None:
        rows.append(("rebuild", f"{REBUILD_COMMAND}  (from the source folder: builds drople_fast._C against "
                                f"this torch {torch.__version__})"))
    rows.append(("attention sdpa", "usable"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = xformers_unavailable(device)
    rows.append(("attention xformers", "usable" if reason is None else f"unavailable: {reason}"))
    rows.append(("cpu", device_label("cpu")))
    rows.append(("cpu bf16", cpu_bf16_advice()))
    rates = gemm_gflops("cpu", repeats=3)
    rows.append(("cpu gemm", f"bf16 {rates['bfloat16']:.0f} / fp32 {rates['float32']:.0f} GFLOP/s "
                             f"({rates['bfloat16'] / rates['float32']:.1f}x; measured now, F.linear 4211 x 512 x 2048)"))
    return rows


def cpu_bf16_advice(cpuinfo: Optional[str] = None, capability: Optional[str] = None) -> str:
    """Whether this CPU has bf16 matrix hardware (``/proc/cpuinfo`` flags; ``cpuinfo`` replaces the file's
    text) and so whether ``--precision bf16`` pays off for CPU training."""
    from .training.precision import BF16_CPU_FLAGS, cpu_bf16_hardware, cpu_flags

    if capability is None:
        capability = torch.backends.cpu.get_cpu_capability()
    have = cpu_bf16_hardware(cpu_flags(cpuinfo))
    extra = f"torch CPU capability {capability}"
    if have:
        return f"yes ({', '.join(have)}; {extra}): --precision bf16 recommended for CPU training"
    return (f"no ({' / '.join(BF16_CPU_FLAGS)} not found; {extra}): bf16 is emulated here, "
            "keep --precision auto (fp32 on the CPU)")


def main() -> int:
    rows = report()
    width = max(len(name) for name, _ in rows)
    for name, status in rows:
        print(f"{name:<{width}}  {status}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
