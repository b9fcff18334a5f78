"""Shared fixtures for the IWTD benchmarks (pytest-benchmark).

Shape of one ViT-B/16 vision layer at batch 32: B=32, S=201 (CLS + 196 patches + 4 prompts),
D=768, H=12, Dh=64, M=64 bridge tokens of width P=512 (a tiny one under BENCH_SMOKE=1: bench/smoke.py).

Memory is measured in one extra, untimed call per benchmark:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  bytes allocated at entry (``peak_bytes``; inputs excluded).
* CPU: ``torch.profiler`` with ``profile_memory=True``; the signed ``[memory]`` events of the
  torch CPU allocator, replayed in time order, give the live bytes over the call.
  ``peak_bytes`` is the peak of that running sum above the level at entry (inputs excluded,
  outputs included); ``largest_alloc_bytes`` is the largest single allocation. Memory that does
  not go through the torch allocator (e.g. ``std::vector`` scratch inside a C++ kernel, oneDNN
  internal buffers) is not seen. tracemalloc is not used: it does not see torch storage.
"""
from __future__ import annotations

import platform

import pytest
import torch

from drople_fast.ops.testing import make_inputs
from smoke import IWTD_LAYER, env_int

SHAPE = {name: getattr(IWTD_LAYER, name) for name in ("B", "S", "D", "H", "Dh", "M", "P")}
ROUNDS = env_int("IWTD_BENCH_ROUNDS", 5, smoke=1)


def make_iwtd_inputs(device="cpu", dtype=torch.float32, seed=0) -> dict:
    """Keyword arguments of drople_fast.iwtd at SHAPE: the tests' input builder (drople_fast.ops.testing)
    with every token but the CLS anchor eligible."""
    return dict(make_inputs(IWTD_LAYER.with_(dtype=dtype), device=device, generator_seed=seed), p_min=0.1,
                p_max=0.5)


@pytest.fixture(scope="session")
def cpu_inputs() -> dict:
    return make_iwtd_inputs("cpu")


@pytest.fixture(scope="session")
def cuda_inputs() -> dict:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return make_iwtd_inputs("cuda")


def _cpu_peak(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = largest = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
        largest = max(largest, nbytes)
    return dict(peak_bytes=int(peak), largest_alloc_bytes=int(largest),
                memory_method="torch.profiler CPU allocator events: peak live bytes above entry")


def _cuda_peak(fn) -> dict:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return dict(peak_bytes=int(torch.cuda.max_memory_allocated() - base),
                memory_method="torch.cuda.max_memory_allocated above entry")


def measure_memory(fn, device: torch.device) -> dict:
    with torch.no_grad():
        return _cuda_peak(fn) if device.type == "cuda" else _cpu_peak(fn)


@pytest.fixture
def run_bench(benchmark):
    """benchmark.pedantic with a warm-up, small round count, memory + shape in extra_info."""

    def go(fn, device="cpu", label="", rounds=ROUNDS, warmup_rounds=1, **extra):
        device = torch.device(device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def timed():
            with torch.no_grad():
                out = fn()
            sync()
            return out

        result = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
        benchmark.extra_info.update(dict(label=label or benchmark.name, device=device.type,
                                         threads=torch.get_num_threads(), **SHAPE, **extra))
        benchmark.extra_info.update(measure_memory(fn, device))
        return result

    return go


def pytest_report_header(config):
    return (f"iwtd bench: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}, shape={SHAPE}, rounds={ROUNDS}")
