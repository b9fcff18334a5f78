"""What only the fused Triton IWTD kernel needs beyond the backend matrix (tests/test_backends.py):
registration, import without Triton, real head/bridge widths, padding with holes.

Runs on CUDA, or on the CPU through the Triton interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 on machines without CUDA). The interpreter is slow, so
shapes are kept small; the whole file takes well under a minute on 2 cores.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1 (it must be set before triton is imported)",
                allow_module_level=True)

from iwtd_harness import Case, assert_matches_reference, make_inputs, run  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check(case: Case, generator_seed: int = 0, **overrides):
    inputs = make_inputs(case, device=DEVICE, generator_seed=generator_seed)
    assert_matches_reference(inputs, "triton", dtype=case.dtype, **overrides)
    return inputs


def test_op_is_registered_and_exposed():
    from drople_fast.ops.backends import select_backend
    from drople_fast.kernels import iwtd_triton

    assert select_backend("triton", torch.device(DEVICE), torch.float32) is iwtd_triton.iwtd_triton_op
    assert hasattr(torch.ops.drople_fast, "iwtd_triton")


def test_kernels_package_imports_without_triton():
    code = "import sys; sys.modules['triton'] = None; import drople_fast.kernels"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.parametrize("B,H,S", [(1, 12, 50), (5, 12, 7)])
def test_twelve_heads(B, H, S):
    # ViT-B/16's head count (the matrix's Triton shapes have at most 3 heads to keep the interpreter fast).
    _check(Case(B, H, S), generator_seed=B * 1000 + S)


def test_vit_sized_sample():
    # S = 201 (197 ViT-B/16 tokens + 4 visual prompts) with real head/bridge widths.
    _check(Case(1, 1, 201, Dh=64, D=96, M=64), generator_seed=1)


def test_text_77_tokens():
    _check(Case(3, 2, 77, Dh=64, D=64, M=64, causal=True, padded=True, anchor="eos"), generator_seed=2)


@pytest.mark.parametrize("causal", [False, True])
def test_valid_with_holes(causal):
    # Padding anywhere (not only a tail), incl. a padded first token: under the causal
    # mask that row has no allowed key at all and must not produce NaNs.
    case = Case(3, 2, 19, causal=causal)
    inputs = make_inputs(case, device=DEVICE)
    g = torch.Generator().manual_seed(5)
    valid = torch.rand(3, 19, generator=g) < 0.7
    valid[:, 0] = torch.tensor([False, True, False])
    anchor = torch.tensor([4, 0, 18])
    valid[torch.arange(3), anchor] = True
    valid = valid.to(DEVICE)
    anchor = anchor.to(DEVICE)
    eligible = inputs["eligible"] & valid
    assert_matches_reference(inputs, "triton", valid=valid, anchor_index=anchor, eligible=eligible)
    out = run(inputs, "triton", valid=valid, anchor_index=anchor, eligible=eligible)
    assert torch.isfinite(out.importance).all() and torch.isfinite(out.drop_prob).all()


