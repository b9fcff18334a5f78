"""One registry of every Triton kernel of the project and the launch configurations its launcher uses.

The ahead-of-time checker (:mod:`drople_fast.ops.aot`) compiles exactly what the
launchers would launch: each kernel module listed in :data:`KERNEL_MODULES`
exposes ``aot_configs(point, cc)``, built from the *same* block-size function
its launcher calls, so a configuration cannot be checked that is not the one
that runs (and vice versa).

Block sizes may differ per Triton version (its code generator and register allocation change between
releases): each ``config`` function takes the version from :func:`triton_version`, so the launcher and
the checker agree under whichever Triton is installed.

Importing this module does not import Triton; :func:`configs_for` does.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import re
from dataclasses import dataclass, field

# Modules that define Triton kernels; each has ``aot_configs(point: MatrixPoint, cc: int) -> list[KernelConfig]``.
KERNEL_MODULES = ("drople_fast.kernels.iwtd_triton", "drople_fast.kernels.noise_triton")

DTYPES = ("fp32", "bf16", "fp16")

# Triton releases before this one take the smaller tiles of the ``config`` functions: under triton 3.6
# the 3.8 choices spill (4-16 bytes) or reach 255 registers (python -m drople_fast.ops.aot).
NEW_TILES_FROM = (3, 7)


@functools.lru_cache(maxsize=None)
def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton (from its metadata: no import); (0, 0) if not installed."""
    for dist in ("triton", "pytorch-triton"):
        try:
            match = re.match(r"(\d+)\.(\d+)", importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            continue
        if match:
            return int(match.group(1)), int(match.group(2))
    return (0, 0)


def new_tiles(version: tuple[int, int] | None = None) -> bool:
    """Whether ``version`` (default: the installed Triton) takes the tiles tuned on triton >= 3.7."""
    return (version or triton_version()) >= NEW_TILES_FROM


@dataclass(frozen=True)
class MatrixPoint:
    """One operator input configuration (what changes the compiled kernels)."""

    causal: bool
    dtype: str  # "fp32" | "bf16" | "fp16": dtype of q, k and hidden
    S: int
    H: int
    Dh: int
    M: int
    D: int

    def __str__(self) -> str:
        return (f"{'causal ' if self.causal else ''}{self.dtype} S={self.S} H={self.H} Dh={self.Dh} "
                f"M={self.M} D={self.D}")


@dataclass(frozen=True)
class KernelConfig:
    """A kernel with one set of compile-time choices: what ``triton.compile`` needs, nothing else."""

    name: str
    fn: object = field(compare=False, hash=False)  # the @triton.jit function
    signature: tuple  # ((arg name, triton type or "constexpr"), ...) in argument order
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    num_stages: int
    divisible: tuple = ()  # int args the runtime would specialise as multiples of 16 (see signature_for)

    def describe(self) -> str:
        consts = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs)
        ptrs = sorted({t[1:] for _, t in self.signature if t.startswith("*")} - {"u8", "i64", "i32"})
        return f"{consts} w={self.num_warps} st={self.num_stages} ptr={'/'.join(ptrs)}"


def divisible_ints(fn, values: dict) -> tuple:
    """Int arguments that Triton's launcher would specialise as multiples of 16 for these ``values``
    (every int argument not in the kernel's ``do_not_specialize`` whose value is a multiple of 16):
    what lets it vectorise loads along a row, so the AOT check must assume it exactly when a launch does."""
    skip = set(getattr(fn, "do_not_specialize", ()) or ())
    return tuple(name for name, value in values.items() if name not in skip and int(value) % 16 == 0)


def signature_for(fn, pointer_types: dict, constexprs: dict, floats=(), int64=()) -> tuple:
    """The full signature of ``fn`` in argument order: pointers as given, constexprs, fp32 scalars, the
    rest int32 (sizes and strides; int64 where listed, as the launcher's values would make Triton pick)."""
    sig = []
    for name in fn.arg_names:
        if name in constexprs:
            sig.append((name, "constexpr"))
        elif name in pointer_types:
            sig.append((name, "*" + pointer_types[name]))
        elif name in floats:
            sig.append((name, "fp32"))
        else:
            sig.append((name, "i64" if name in int64 else "i32"))
    return tuple(sig)


def configs_for(point: MatrixPoint, cc: int, kernel_filter: str = "") -> list[KernelConfig]:
    """Every kernel configuration the launchers would compile for ``point`` on compute capability ``cc``."""
    out = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for config in module.aot_configs(point, cc):
            if kernel_filter in config.name:
                out.append(config)
    return out


def full_matrix() -> list[MatrixPoint]:
    """The configuration matrix every kernel must compile for without spilling (issue 10)."""
    points = []
    for causal in (False, True):
        for dtype in DTYPES:
            for S in (1, 2, 17, 77, 201, 257, 577, 1025, 2049):
                for H in (8, 12, 16):
                    for Dh in (64, 80, 128):
                        for M in (16, 64, 128):
                            for D in (512, 768, 1024):
                                points.append(MatrixPoint(causal, dtype, S, H, Dh, M, D))
    return points


def quick_matrix() -> list[MatrixPoint]:
    """A handful of points for CI: the real ViT-B/16 and text shapes, the widest corners, and the short
    sequences whose tiles spilled under triton 3.6 before its own tiles (each ``config``'s docstring)."""
    return [
        MatrixPoint(False, "bf16", 201, 12, 64, 64, 768),
        MatrixPoint(True, "fp16", 77, 8, 64, 64, 512),
        MatrixPoint(False, "fp32", 577, 16, 128, 128, 1024),
        MatrixPoint(True, "fp32", 1, 8, 80, 64, 512),
        MatrixPoint(True, "bf16", 17, 8, 80, 16, 512),
        MatrixPoint(False, "bf16", 257, 8, 64, 16, 512),
    ]
