"""Comparisons for testing any IWTD backend against the reference (inputs: drople_fast.ops.testing)."""
from __future__ import annotations

import torch

import drople_fast as df
from drople_fast.ops.philox import token_uniform
from drople_fast.ops.testing import Case, make_inputs, op_args

__all__ = ["Case", "make_inputs", "op_args", "TOLERANCE", "run", "assert_matches_reference", "assert_same_decisions",
           "assert_outputs_match", "compile_and_compare"]

# fp32 scores must match to 1e-5 relative; low precision inputs are compared
# to the reference run on the *same rounded inputs*, so only accumulation
# order differs.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1e-4, atol=1e-5),
             torch.float16: dict(rtol=1e-4, atol=1e-5)}


def run(inputs: dict, backend: str, **overrides) -> df.IWTDOutput:
    return df.iwtd(**{**inputs, **overrides}, backend=backend)


def assert_same_decisions(got: df.IWTDOutput, want: df.IWTDOutput, seed, dtype: torch.dtype = torch.float32,
                          row_stride: int = 0, what: str = "") -> None:
    """Drop masks equal except where the uniform draw lies within rounding of p, and then only at a few tokens;
    keep_count / keep_order identical for every sample whose mask agrees.

    Two correct backends compute p to within rounding, so a token whose draw u lies that close to p may
    flip. Such flips must be rare (at most one per thousand tokens, and at least one allowed): more
    means the backends disagree on the draws, not on rounding.
    """
    got_mask, want_mask = got.drop_mask.cpu(), want.drop_mask.cpu()
    differ = got_mask != want_mask
    if differ.any():
        B, S = want_mask.shape
        u = token_uniform(seed.cpu() if isinstance(seed, torch.Tensor) else seed, B, S, row_stride=row_stride)
        gap = (u - want.drop_prob.cpu()).abs()[differ]
        near = 10 * TOLERANCE[dtype]["atol"]
        assert gap.max() < near, f"{what}drop_mask differs away from the p boundary (|u - p| = {gap.tolist()})"
        bound = max(1, differ.numel() // 1000)
        assert int(differ.sum()) <= bound, f"{what}{int(differ.sum())} drop_mask flips, at most {bound} allowed"
    same = ~differ.any(dim=1)
    assert torch.equal(got.keep_count.cpu()[same], want.keep_count.cpu()[same]), f"{what}keep_count differs"
    assert torch.equal(got.keep_order.cpu()[same], want.keep_order.cpu()[same]), f"{what}keep_order differs"
    # each flipped token changes its sample's count by one
    flips = differ.sum(dim=1)
    assert torch.all((got.keep_count.cpu() - want.keep_count.cpu()).abs() <= flips), f"{what}keep_count off"
    if bool(same.all()):
        assert torch.equal(got.keep_index.cpu(), want.keep_index.cpu()), f"{what}keep_index differs"


def assert_matches_reference(inputs: dict, backend: str, dtype: torch.dtype = torch.float32, **overrides):
    """Scores within tolerance, decisions identical to the reference backend (see assert_same_decisions)."""
    ref = run(inputs, "reference", **overrides)
    got = run(inputs, backend, **overrides)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.importance.cpu(), ref.importance.cpu(), **tol)
    torch.testing.assert_close(got.drop_prob.cpu(), ref.drop_prob.cpu(), **tol)
    merged = {**inputs, **overrides}
    assert_same_decisions(got, ref, merged.get("seed", 0), dtype, merged.get("row_stride", 0), f"{backend}: ")
    return got, ref


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
