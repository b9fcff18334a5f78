"""The distribution ships the top-level kernels/ folder as drople_fast.kernels (setup.py package_dir)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_imports_the_top_level_kernels():
    import drople_fast.kernels as kernels
    from drople_fast.kernels import registry

    assert Path(kernels.__file__).resolve().parent == ROOT / "kernels"
    assert all(name.startswith("drople_fast.kernels.") for name in registry.KERNEL_MODULES)


@pytest.mark.slow
def test_wheel_contains_every_kernel_module(tmp_path):
    # A copy of the sources, so the build's own folders (build/, *.egg-info) stay out of the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("drople_fast", "kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = dict(os.environ, DROPLE_FAST_NO_EXT="1")  # the pure-Python wheel: packaging only
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, env=env, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("drople_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"drople_fast/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert expected and expected <= names
    assert not any(n.startswith("kernels/") or "/ops/kernels/" in n for n in names)
