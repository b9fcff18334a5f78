"""``python -m drople_fast.info``: versions, and which backends are usable here and why not."""
from __future__ import annotations

import importlib.metadata
import platform

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
    rows.append(("attention sdpa", "usable"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = xformers_unavailable(device)
    rows.append(("attention xformers", "usable" if reason is None else f"unavailable: {reason}"))
    return rows


def main() -> int:
    rows = report()
    width = max(len(name) for name, _ in rows)
    for name, status in rows:
        print(f"{name:<{width}}  {status}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
