"""Build and install drople_fast with its C++ CPU extension ``drople_fast._C``.

Install into an environment that already has torch (the extension is compiled
against that torch, so build isolation must be off)::

    pip install --no-build-isolation -e .          # editable, for development
    pip install --no-build-isolation .             # regular install

Set ``DROPLE_FAST_NO_EXT=1`` to install the pure-Python package without the
extension (the "cpp" backend then reports itself unavailable) and
``DROPLE_FAST_DEBUG=1`` for an unoptimised build with debug symbols.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    text = (ROOT / "drople_fast" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.MULTILINE)
    if not match:
        raise RuntimeError("drople_fast/__init__.py does not define __version__")
    return match.group(1)


def exact_flags() -> list[str]:
    """Compiler flags that bit-exactness depends on: csrc/exact_flags.txt, shared with CMakeLists.txt."""
    lines = (ROOT / "csrc" / "exact_flags.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def extension_modules():
    """The C++ extension, or nothing if disabled / torch is missing."""
    if os.environ.get("DROPLE_FAST_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as err:  # pragma: no cover - build isolation without torch
        raise RuntimeError(
            "building drople_fast._C needs torch in the build environment: install torch first and run "
            "`pip install --no-build-isolation -e .` (or set DROPLE_FAST_NO_EXT=1 to skip the extension)"
        ) from err

    debug = os.environ.get("DROPLE_FAST_DEBUG") == "1"
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags += exact_flags() + ["-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    ext = CppExtension(
        name="drople_fast._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        depends=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.h")) + ["csrc/exact_flags.txt"],
        extra_compile_args={"cxx": cxx_flags},
        # No -fopenmp (a second OpenMP runtime could be loaded): csrc/parallel_items.h spreads the work
        # over torch's inter-op pool itself, since at::parallel_for would run serially here.
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="drople_fast",
    version=read_version(),
    description="Fast DroPLe (Dropout Prompt Learning) for open_clip CLIP models: fused importance-weighted "
                "token dropout with real token removal",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level kernels/ folder and ship as drople_fast.kernels (a name
    # that cannot collide with another distribution's top-level package).
    packages=find_packages(include=["drople_fast", "drople_fast.*"]) + ["drople_fast.kernels"],
    package_dir={"drople_fast.kernels": "kernels"},
    include_package_data=True,
    # The lower bounds are what CI's second leg tests (scripts/setup_env_oldest.sh: torch 2.11, torchvision
    # 0.26, triton 3.6, what the GPU machines carry); the first leg tests the newest the mirrors offer.
    # numpy has no upper bound here: only triton < 3.7's CPU interpreter (tests, the --cpu-dry GPU check)
    # needs numpy < 2.4, and the triton backend says so when it refuses (ops/backends.py).
    install_requires=[
        "torch>=2.11",
        "torchvision>=0.26",
        "open_clip_torch>=3.0",
        "numpy",
        "tqdm",
        "pillow",
        "safetensors",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "gpu": ["triton>=3.6", "xformers"],
    },
    entry_points={"console_scripts": ["drople-fast = drople_fast.training.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
