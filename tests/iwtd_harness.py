"""Shared inputs and comparisons for testing any IWTD backend against the reference."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import drople_fast as df

# fp32 scores must match to 1e-5 relative; low precision inputs are compared
# to the reference run on the *same rounded inputs*, so only accumulation
# order differs.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1e-4, atol=1e-5),
             torch.float16: dict(rtol=1e-4, atol=1e-5)}


@dataclass
class Case:
    B: int
    H: int
    S: int
    Dh: int = 8
    D: int = 24
    M: int = 6
    P: int = 10
    causal: bool = False
    padded: bool = False
    anchor: str = "first"  # "first" (vision CLS) or "eos" (per-sample text EOS)
    dtype: torch.dtype = torch.float32
    seed: int = 0


def make_inputs(case: Case, device="cpu", generator_seed: int = 0) -> dict:
    """Random but realistic IWTD arguments for ``case``; logits are scaled so softmaxes are peaky."""
    g = torch.Generator().manual_seed(generator_seed)
    B, H, S = case.B, case.H, case.S

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(case.dtype).to(device)

    valid = torch.ones(B, S, dtype=torch.bool)
    if case.padded and S > 2:
        lengths = torch.randint(2, S + 1, (B,), generator=g)
        lengths[0] = S
        valid = torch.arange(S)[None, :] < lengths[:, None]
    if case.anchor == "eos":
        anchor = valid.sum(dim=1) - 1
    else:
        anchor = torch.zeros(B, dtype=torch.int64)
    eligible = (torch.rand(B, S, generator=g) < 0.8) & valid
    return dict(
        q=randn(B, H, S, case.Dh, scale=1.5), k=randn(B, H, S, case.Dh, scale=1.5),
        hidden=randn(B, S, case.D), eligible=eligible.to(device),
        bridge_tokens=randn(case.M, case.P, scale=0.5), bridge_weight=randn(case.P, case.D, scale=0.3),
        bridge_bias=randn(case.P, scale=0.1), anchor_index=anchor.to(device),
        valid=valid.to(device) if case.padded else None, causal=case.causal, seed=case.seed,
    )


def run(inputs: dict, backend: str, **overrides) -> df.IWTDOutput:
    return df.iwtd(**{**inputs, **overrides}, backend=backend)


def assert_matches_reference(inputs: dict, backend: str, dtype: torch.dtype = torch.float32, **overrides):
    """Scores within tolerance and integer outputs identical to the reference backend."""
    ref = run(inputs, "reference", **overrides)
    got = run(inputs, backend, **overrides)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.importance.cpu(), ref.importance.cpu(), **tol)
    torch.testing.assert_close(got.drop_prob.cpu(), ref.drop_prob.cpu(), **tol)
    # A mask can only differ where the uniform draw lies within rounding of p.
    differ = got.drop_mask.cpu() != ref.drop_mask.cpu()
    if differ.any():
        from drople_fast.ops.philox import token_uniform

        u = token_uniform(inputs.get("seed", 0), *ref.drop_mask.shape)
        gap = (u - ref.drop_prob.cpu()).abs()[differ]
        assert gap.max() < 1e-5, f"{backend} drop_mask differs from reference away from the p boundary: {gap}"
        return
    assert torch.equal(got.keep_count.cpu(), ref.keep_count.cpu())
    assert torch.equal(got.keep_order.cpu(), ref.keep_order.cpu())
    assert torch.equal(got.keep_index.cpu(), ref.keep_index.cpu())


# Shapes the issue asks for: odd S, H in {1, 3, 12}, B in {1, 5}.
ODD_SHAPES = [(1, 1, 2), (5, 3, 7), (1, 12, 50), (5, 3, 197), (1, 1, 201), (5, 12, 7)]


def assert_outputs_match(got, want) -> None:
    """Float outputs within fp32 tolerance, integer/bool outputs identical."""
    for g, w in zip(got, want):
        if g.is_floating_point():
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(g, w)


def compile_and_compare(step, args, backend: str = "aot_eager"):
    """``torch.compile(step, fullgraph=True)`` (a graph break raises), checked against eager.

    aot_eager traces the custom ops through their fake implementations and registered autograd
    without spending CPU time in inductor's code generation. Returns (compiled, its outputs).
    """
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    got = compiled(*args)
    assert_outputs_match(got, step(*args))
    return compiled, got
