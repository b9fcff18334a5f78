"""What a benchmark record says about the machine it ran on (one home for the learner benchmarks'
records), and the device sync every timing loop in bench/ uses.

EPYCs that report the same CPU flags differ 2x in what bf16 autocast can win (this project's machines:
bf16 GEMMs ~2.2x fp32 on one, ~4.5x on family 26, Zen 5), so besides the model name, x86 family and
flags every record carries the GEMM rates it ran at.
"""
from __future__ import annotations

import os

import torch

from drople_fast.training.precision import cpu_bf16_summary, device_label, gemm_gflops

from smoke import SMOKE

_GEMM: dict = {}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine_record(device: torch.device) -> dict:
    """The machine fields of a benchmark's ``extra_info``; the GEMM rates measured once per process
    (at 64 rows under BENCH_SMOKE)."""
    if not _GEMM:
        _GEMM.update(gemm_gflops(device, rows=64 if SMOKE else 4211))
    return dict(device=device.type, device_name=device_label(device), threads=torch.get_num_threads(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), cpu_flags=cpu_bf16_summary(),
                loadavg=os.getloadavg()[0], gemm_gflops=dict(_GEMM))
