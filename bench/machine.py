"""What a benchmark record says about the machine it ran on: one home for both learner benchmarks.

EPYCs that report the same CPU flags differ 2x in what bf16 autocast can win (this project's machines:
bf16 GEMMs ~2.2x fp32 on one, ~4.5x on family 26, Zen 5), so besides the model name, x86 family and
flags every record carries the GEMM rates it ran at.
"""
from __future__ import annotations

import os
import time

import torch

from drople_fast.training.precision import cpu_bf16_summary, device_label

from smoke import SMOKE

_GEMM: dict = {}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gemm_gflops(device: torch.device) -> dict:
    """fp32 and bf16 ``F.linear`` throughput (GFLOP/s, fastest of 7) at the text tower's MLP shape,
    (4211, 512) x (512, 2048) (4,211: the 500-class tower's valid tokens; 64 under BENCH_SMOKE), once
    per process."""
    rows = 64 if SMOKE else 4211
    if not _GEMM:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, 512, device=device, dtype=dtype)
            w = torch.randn(2048, 512, device=device, dtype=dtype)
            best = float("inf")
            for _ in range(7):
                sync(device)
                t0 = time.perf_counter()
                torch.nn.functional.linear(x, w)
                sync(device)
                best = min(best, time.perf_counter() - t0)
            _GEMM[str(dtype).removeprefix("torch.")] = round(2 * rows * 512 * 2048 / best / 1e9, 1)
    return dict(_GEMM)


def machine_record(device: torch.device) -> dict:
    """The machine fields of a benchmark's ``extra_info``."""
    return dict(device=device.type, device_name=device_label(device), threads=torch.get_num_threads(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), cpu_flags=cpu_bf16_summary(),
                loadavg=os.getloadavg()[0], gemm_gflops=gemm_gflops(device))
