"""Ahead-of-time check of every Triton kernel of the project: ``python -m drople_fast.ops.aot``.

No GPU is needed. For each compute capability (sm_80, sm_90 by default) and each
point of the configuration matrix, the launch configurations that the launchers
would use (one registry: :mod:`drople_fast.kernels.registry`) are compiled
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``; the PTX
is then assembled by the ``ptxas`` shipped in Triton's wheel with ``-v`` to read
registers, spill bytes and shared memory, and the tensor-core instructions are
counted (``mma``/``wgmma`` in the PTX, ``HMMA``/``HGMMA`` in the SASS).

Identical configurations (many matrix points share block sizes) are compiled
once. Exit status: 0 if everything compiled and nothing spills, 1 otherwise.

    python -m drople_fast.ops.aot                 # full matrix, sm_80 + sm_90
    python -m drople_fast.ops.aot --quick         # three points (CI)
    python -m drople_fast.ops.aot --arch 90 --kernel scores --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..kernels.registry import (NEW_TILES_FROM, KernelConfig, MatrixPoint, configs_for, full_matrix, new_tiles,
                                quick_matrix)

_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_STACK = re.compile(r"(\d+) bytes stack frame")


@dataclass
class Result:
    kernel: str
    cc: int
    config: str
    points: int
    example: str
    ok: bool = False
    error: str = ""
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0  # Triton's shared-memory allocation (dynamic smem at launch) + ptxas static smem
    mma_ptx: int = 0  # tensor-core instructions in the PTX (mma.sync / wgmma.mma_async)
    mma_sass: int = 0  # HMMA/HGMMA/IMMA in the SASS (-1 if cuobjdump is missing)
    seconds: float = 0.0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def nvidia_tool(name: str) -> Path:
    """A binary from Triton's NVIDIA backend (``ptxas``, ``cuobjdump``); FileNotFoundError if absent."""
    import triton.backends.nvidia as nv

    path = Path(nv.__file__).parent / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (Triton's wheel ships it for CUDA targets)")
    return path


def parse_ptxas(log: str) -> dict:
    """Registers, spill and stack bytes, static shared memory from ``ptxas -v`` output (one kernel)."""
    regs = _REGS.search(log)
    if regs is None:
        raise ValueError(f"no register count in ptxas output: {log[-500:]!r}")
    spill = _SPILL.search(log)
    smem = _SMEM.search(log)
    stack = _STACK.search(log)
    return dict(
        registers=int(regs.group(1)),
        spill_stores=int(spill.group(1)) if spill else 0,
        spill_loads=int(spill.group(2)) if spill else 0,
        shared_static=int(smem.group(1)) if smem else 0,
        stack_bytes=int(stack.group(1)) if stack else 0,
    )


def count_tensor_core_ptx(ptx: str) -> int:
    return len(re.findall(r"^\s*(?:wgmma\.mma_async|mma\.sync)\S*", ptx, flags=re.M))


def count_tensor_core_sass(sass: str) -> int:
    return len(re.findall(r"\b(?:HMMA|HGMMA|IMMA|IGMMA)\b", sass))


def _attrs(config: KernelConfig) -> dict:
    # torch allocations are 16-byte aligned and Triton specialises on it at launch: do the same.
    # Int arguments: as the launch would specialise them for this matrix point (registry.divisible_ints).
    return {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(config.signature)
            if ty.startswith("*") or name in config.divisible}


def compile_one(config: KernelConfig, cc: int) -> dict:
    """Compile ``config`` for ``cc``; the numbers of :class:`Result` (or ``error``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    try:
        if not hasattr(config.fn, "cache_key"):
            raise RuntimeError("kernel was decorated under TRITON_INTERPRET=1; run the checker without it")
        signature = dict(config.signature)
        index = {name: i for i, (name, _) in enumerate(config.signature)}
        constexprs = {(index[name],): value for name, value in config.constexprs}
        src = ASTSource(config.fn, signature, constexprs=constexprs, attrs=_attrs(config))
        kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
        ptx = kernel.asm["ptx"]
        arch = re.search(r"^\.target\s+(sm_\w+)", ptx, flags=re.M).group(1)
        with tempfile.TemporaryDirectory() as tmp:
            ptx_path = Path(tmp) / "k.ptx"
            ptx_path.write_text(ptx)
            proc = subprocess.run([str(nvidia_tool("ptxas")), "-v", "--gpu-name", arch, str(ptx_path), "-o",
                                   str(Path(tmp) / "k.cubin")], capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"ptxas failed: {proc.stderr[-500:]}")
            stats = parse_ptxas(proc.stdout + proc.stderr)
            try:
                cubin = Path(tmp) / "triton.cubin"
                cubin.write_bytes(kernel.asm["cubin"])
                sass = subprocess.run([str(nvidia_tool("cuobjdump")), "-sass", str(cubin)], capture_output=True,
                                      text=True, timeout=600).stdout
                mma_sass = count_tensor_core_sass(sass)
            except (FileNotFoundError, KeyError):
                mma_sass = -1
        return dict(ok=True, registers=stats["registers"], spill_stores=stats["spill_stores"],
                    spill_loads=stats["spill_loads"], stack_bytes=stats["stack_bytes"],
                    shared_bytes=int(kernel.metadata.shared) + stats["shared_static"],
                    mma_ptx=count_tensor_core_ptx(ptx), mma_sass=mma_sass,
                    seconds=time.perf_counter() - start)
    except Exception as err:  # report every failure, keep checking the rest
        return dict(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300],
                    seconds=time.perf_counter() - start)


def _compile_job(job):
    # Jobs travel to worker processes as (point, cc, kernel name): @triton.jit functions do not pickle.
    point, cc, name = job
    config = next(c for c in configs_for(point, cc) if c.name == name)
    return compile_one(config, cc)


def collect(points: list[MatrixPoint], archs: list[int], kernel_filter: str = "") -> list[tuple[KernelConfig, int, list]]:
    """Unique (config, cc) pairs with the matrix points that use them, in first-seen order."""
    unique: dict = {}
    for cc in archs:
        for point in points:
            for config in configs_for(point, cc, kernel_filter):
                unique.setdefault((config, cc), []).append(point)
    return [(config, cc, pts) for (config, cc), pts in unique.items()]


def run_checks(points: list[MatrixPoint], archs: list[int], kernel_filter: str = "", jobs: int = 1,
               progress=None) -> list[Result]:
    todo = collect(points, archs, kernel_filter)
    results = [Result(config.name, cc, config.describe(), len(pts), str(pts[0])) for config, cc, pts in todo]
    jobs_list = [(pts[0], cc, config.name) for config, cc, pts in todo]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            outcomes = pool.map(_compile_job, jobs_list)
            for result, outcome in zip(results, outcomes):
                _fill(result, outcome, progress)
    else:
        for result, job in zip(results, jobs_list):
            _fill(result, _compile_job(job), progress)
    return results


def _fill(result: Result, outcome: dict, progress) -> None:
    for key, value in outcome.items():
        setattr(result, key, value)
    if progress:
        progress(result)


HEADER = ("kernel", "sm", "regs", "spill st/ld", "stack", "smem", "mma ptx/sass", "points", "status", "config")


def row(r: Result) -> tuple:
    status = "FAIL " + r.error if not r.ok else ("SPILL" if r.spills else "ok")
    return (r.kernel, str(r.cc), str(r.registers), f"{r.spill_stores}/{r.spill_loads}", str(r.stack_bytes),
            str(r.shared_bytes), f"{r.mma_ptx}/{r.mma_sass}", str(r.points), status, r.config)


def format_table(results: list[Result]) -> str:
    rows = [HEADER] + [row(r) for r in results]
    widths = [max(len(x[i]) for x in rows) for i in range(len(HEADER) - 1)]
    lines = []
    for x in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(x[:-1], widths)) + "  " + x[-1])
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    lines = []
    for cc in sorted({r.cc for r in results}):
        for name in sorted({r.kernel for r in results if r.cc == cc}):
            rs = [r for r in results if r.cc == cc and r.kernel == name]
            ok = [r for r in rs if r.ok]
            lines.append(
                f"sm_{cc} {name}: {len(rs)} configs ({sum(r.points for r in rs)} matrix points), "
                f"{len(rs) - len(ok)} failed, {sum(r.spills for r in ok)} spill, "
                f"max {max((r.registers for r in ok), default=0)} registers, "
                f"max smem {max((r.shared_bytes for r in ok), default=0)} B, "
                f"tensor-core instr (sass) {min((r.mma_sass for r in ok), default=0)}.."
                f"{max((r.mma_sass for r in ok), default=0)}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drople_fast.ops.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    parser.add_argument("--quick", action="store_true", help="a handful of matrix points instead of the full matrix")
    parser.add_argument("--kernel", default="", help="only kernels whose name contains this string")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="parallel compiler processes")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    parser.add_argument("--quiet", action="store_true", help="only the summary (and failures/spills)")
    parser.add_argument("--progress", action="store_true", help="a line on stderr per compiled configuration")
    args = parser.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        parser.error(f"--arch must be comma-separated integers like 80,90, got {args.arch!r}")
    try:
        nvidia_tool("ptxas")
    except (ImportError, FileNotFoundError) as err:
        print(f"aot: cannot check: {err}", file=sys.stderr)
        return 2
    points = quick_matrix() if args.quick else full_matrix()
    import triton

    cut = ".".join(map(str, NEW_TILES_FROM))
    print(f"aot: triton {triton.__version__}: the tiles for triton {'>=' if new_tiles() else '<'} {cut} "
          f"(kernels/registry.py)", flush=True)
    done = []

    def progress(r: Result) -> None:
        done.append(r)
        if args.progress:
            print(f"[{len(done)}] sm_{r.cc} {r.kernel} {r.registers} regs "
                  f"{'FAIL' if not r.ok else 'SPILL' if r.spills else 'ok'} ({r.seconds:.1f}s)", file=sys.stderr,
                  flush=True)

    results = run_checks(points, archs, args.kernel, jobs=args.jobs, progress=progress)
    if not results:
        print(f"aot: no kernel matches --kernel {args.kernel!r}", file=sys.stderr)
        return 2
    bad = [r for r in results if not r.ok or r.spills]
    print(format_table(bad if args.quiet else results))
    print(summary(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    if bad:
        print(f"aot: {sum(not r.ok for r in bad)} compile failure(s), {sum(r.ok for r in bad)} spilling config(s)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Kernels imported from here on are compilable JITFunctions. Only as a program: main() called
    # in-process (tests) must not change the environment of everything that runs after it.
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
