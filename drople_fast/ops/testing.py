"""IWTD inputs for tests and benchmarks (the operator never imports this module).

One builder serves the backend test matrix (tests/test_backends.py), the other
backend tests and the benchmarks (bench/), so every backend is exercised on the
same kind of input: peaky softmaxes (q, k scaled by 1.5), optional right
padding with a per-sample EOS anchor, and a random eligible set.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .primitives import fold_bridge


@dataclass(frozen=True)
class Case:
    """Sizes and layout of one IWTD call: (B, H, S, Dh) q/k, (B, S, D) hidden, M bridge tokens of width P."""

    B: int
    H: int
    S: int
    Dh: int = 8
    D: int = 24
    M: int = 6
    P: int = 10
    causal: bool = False
    padded: bool = False  # right padding: sample 0 full length, the others random lengths >= 2
    anchor: str = "first"  # "first" (vision CLS) or "eos" (text: the last valid token of each sample)
    eligible: str = "random"  # "random" (80 % of valid tokens) or "content" (every valid token but the anchor)
    dtype: torch.dtype = torch.float32
    seed: int = 0  # the Philox seed of the call (generator_seed below draws the tensors)

    def with_(self, **changes) -> "Case":
        return replace(self, **changes)


# One ViT-B/16 vision layer at batch 32: CLS + 196 patches + 4 visual prompts, 12 heads of 64, width 768,
# 64 bridge tokens of width 512. The benchmarks' shape.
VIT_B16_LAYER = Case(32, 12, 201, Dh=64, D=768, M=64, P=512, eligible="content", seed=1234)


def make_inputs(case: Case, device="cpu", generator_seed: int = 0) -> dict:
    """Keyword arguments of :func:`drople_fast.iwtd` for ``case`` (tensors drawn on the CPU, then moved)."""
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
    elif case.anchor == "first":
        anchor = torch.zeros(B, dtype=torch.int64)
    else:
        raise ValueError(f"anchor must be 'first' or 'eos', got {case.anchor!r}")
    if case.eligible == "random":
        eligible = (torch.rand(B, S, generator=g) < 0.8) & valid
    elif case.eligible == "content":
        eligible = valid.clone()
        eligible[torch.arange(B), anchor] = False
    else:
        raise ValueError(f"eligible must be 'random' or 'content', got {case.eligible!r}")
    return dict(
        q=randn(B, H, S, case.Dh, scale=1.5), k=randn(B, H, S, case.Dh, scale=1.5),
        hidden=randn(B, S, case.D), eligible=eligible.to(device),
        bridge_tokens=randn(case.M, case.P, scale=0.5), bridge_weight=randn(case.P, case.D, scale=0.3),
        bridge_bias=randn(case.P, scale=0.1), anchor_index=anchor.to(device),
        valid=valid.to(device) if case.padded else None, causal=case.causal, seed=case.seed,
    )


def op_args(inputs: dict, seed: int | None = None, p_min: float = 0.1, p_max: float = 0.5, **overrides) -> tuple:
    """Positional arguments of a fused backend op (see :mod:`drople_fast.ops.backends`), built as ``iwtd`` does."""
    inputs = {**inputs, **overrides}
    q = inputs["q"]
    B, _, S, _ = q.shape
    device = q.device
    folded, shift = fold_bridge(inputs["bridge_tokens"], inputs["bridge_weight"], inputs["bridge_bias"])
    valid = inputs["valid"] if inputs["valid"] is not None else torch.ones(B, S, dtype=torch.bool, device=device)
    anchor = inputs["anchor_index"]
    if isinstance(anchor, int):
        anchor = torch.full((B,), anchor, dtype=torch.int64, device=device)
    seed = inputs["seed"] if seed is None else seed
    return (q.contiguous(), inputs["k"].contiguous(), inputs["hidden"].contiguous(),
            inputs["eligible"].expand(B, S).contiguous(), valid.contiguous(), anchor.to(torch.int64).contiguous(),
            folded.contiguous(), shift.contiguous(), bool(inputs["causal"]), p_min, p_max,
            torch.tensor([seed], dtype=torch.int64, device=device))
