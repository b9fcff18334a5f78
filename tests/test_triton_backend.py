"""The fused Triton IWTD kernel against the reference (tests/iwtd_harness.py).

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

import drople_fast as df  # noqa: E402
from drople_fast.ops.philox import token_uniform  # noqa: E402

from iwtd_harness import ODD_SHAPES, Case, assert_matches_reference, make_inputs, run  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _check(case: Case, generator_seed: int = 0, **overrides):
    inputs = make_inputs(case, device=DEVICE, generator_seed=generator_seed)
    assert_matches_reference(inputs, "triton", dtype=case.dtype, **overrides)
    return inputs


def test_op_is_registered_and_exposed():
    from drople_fast.ops.backends import select_backend
    from drople_fast.ops.kernels import iwtd_triton

    assert select_backend("triton", torch.device(DEVICE), torch.float32) is iwtd_triton.iwtd_triton_op
    assert hasattr(torch.ops.drople_fast, "iwtd_triton")


def test_kernels_package_imports_without_triton():
    code = "import sys; sys.modules['triton'] = None; import drople_fast.ops.kernels as k; assert not k.triton_available()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.parametrize("B,H,S", ODD_SHAPES)
def test_odd_shapes(B, H, S):
    _check(Case(B, H, S))


def test_vit_sized_sample():
    # S = 201 (197 ViT-B/16 tokens + 4 visual prompts) with real head/bridge widths.
    _check(Case(1, 1, 201, Dh=64, D=96, M=64), generator_seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
def test_text_causal_padded_eos(dtype):
    _check(Case(5, 3, 23, causal=True, padded=True, anchor="eos", dtype=dtype))


def test_text_77_tokens():
    _check(Case(3, 2, 77, Dh=64, D=64, M=64, causal=True, padded=True, anchor="eos"), generator_seed=2)


def test_two_tokens_causal():
    _check(Case(3, 1, 2, causal=True, anchor="eos"))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_inputs(dtype):
    _check(Case(4, 2, 40, padded=True, dtype=dtype), generator_seed=3)


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


def test_all_ineligible_sample():
    case = Case(3, 2, 11)
    inputs = make_inputs(case, device=DEVICE)
    eligible = inputs["eligible"].clone()
    eligible[1] = False
    assert_matches_reference(inputs, "triton", eligible=eligible)
    out = run(inputs, "triton", eligible=eligible)
    assert (out.drop_prob[1] == 0).all() and not out.drop_mask[1].any()
    assert int(out.keep_count[1]) == case.S
    assert torch.equal(out.keep_order[1].cpu(), torch.arange(case.S))


def test_equal_scores_give_p_max():
    # Zero q, k and hidden: every score is constant over C, the min-max range is zero
    # (counted as one), so every eligible content token gets exactly p_max.
    case = Case(3, 2, 13, padded=True)
    inputs = make_inputs(case, device=DEVICE)
    for name in ("q", "k", "hidden"):
        inputs[name] = torch.zeros_like(inputs[name])
    p_max = 0.45
    assert_matches_reference(inputs, "triton", p_max=p_max)
    out = run(inputs, "triton", p_max=p_max)
    content = out.valid.clone()
    content[:, 0] = False
    expected = torch.where(inputs["eligible"] & content, torch.tensor(p_max, dtype=torch.float32), 0.0)
    assert torch.equal(out.drop_prob.cpu(), expected.cpu())
    for b in range(case.B):
        c = out.importance[b][content[b]]
        assert torch.equal(c, c.roll(1)), "importance should be constant over C"


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**33 + 7, 2**62 + 99, -5])
def test_drop_mask_equals_reference_exactly(seed):
    case = Case(4, 2, 29, padded=True, seed=seed)
    inputs = make_inputs(case, device=DEVICE, generator_seed=4)
    ref = run(inputs, "reference")
    got = run(inputs, "triton")
    assert torch.equal(got.drop_mask.cpu(), ref.drop_mask.cpu())
    assert torch.equal(got.keep_count.cpu(), ref.keep_count.cpu())
    assert torch.equal(got.keep_order.cpu(), ref.keep_order.cpu())


@pytest.mark.parametrize("seed", [3, 2**40 + 11])
def test_philox_stream_matches_tl_rand(seed):
    # p_min == p_max makes p exact, so the mask is the uniform stream itself.
    case = Case(3, 1, 17, seed=seed)
    inputs = make_inputs(case, device=DEVICE)
    got = run(inputs, "triton", p_min=0.3, p_max=0.3)
    u = token_uniform(seed, case.B, case.S)
    content = torch.ones(case.B, case.S, dtype=torch.bool)
    content[:, 0] = False
    expected = inputs["eligible"].cpu() & content & (u < 0.3)
    assert torch.equal(got.drop_mask.cpu(), expected)


def test_opcheck():
    from drople_fast.ops.kernels.iwtd_triton import iwtd_triton_op
    from drople_fast.ops.primitives import fold_bridge

    inputs = make_inputs(Case(2, 2, 9, padded=True), device=DEVICE)
    folded, shift = fold_bridge(inputs["bridge_tokens"], inputs["bridge_weight"], inputs["bridge_bias"])
    valid = inputs["valid"]
    anchor = inputs["anchor_index"]
    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    args = (inputs["q"], inputs["k"], inputs["hidden"], inputs["eligible"], valid, anchor, folded, shift,
            False, 0.1, 0.5, seed)
    torch.library.opcheck(iwtd_triton_op, args)


def test_torch_compile_fullgraph():
    # Under the interpreter, trace with aot_eager (dynamo + fake tensors, no graph break,
    # but no slow C++ codegen); on a GPU compile with inductor.
    inputs = make_inputs(Case(2, 2, 9), device=DEVICE)

    def step(q, k, hidden):
        out = df.iwtd(q, k, hidden, inputs["eligible"], inputs["bridge_tokens"], inputs["bridge_weight"],
                      inputs["bridge_bias"], 0, seed=3, backend="triton")
        return out.importance, out.drop_prob, out.drop_mask, out.keep_order, out.bridge_features

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if INTERPRETED else "inductor")
    got = compiled(inputs["q"], inputs["k"], inputs["hidden"])
    want = step(inputs["q"], inputs["k"], inputs["hidden"])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
