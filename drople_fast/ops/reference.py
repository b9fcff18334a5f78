"""Plain-PyTorch IWTD: the oracle every fast backend is tested against.

It follows docs/design.md §2 literally and materialises the (B, H, S, S) attention
map. All arithmetic is float32 whatever the input dtype, as in the kernels.

The computation is split in two so the open_clip integration can reuse the
second half on an attention map it already has ("perturb" mode, tests):

* :func:`attention_probs` -- q, k -> softmax attention with padding/causal masks;
* :func:`iwtd_from_attention` -- attention + hidden + folded bridge -> scores,
  probabilities, Bernoulli mask and keep indices.
"""
from __future__ import annotations

import math

import torch

from .philox import token_uniform
from .primitives import bridge_logits, keep_order

EPS = 1e-8


def allowed_keys(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, 1, S, S) bool: key k is visible from query j (valid, and k <= j if causal)."""
    S = valid.shape[1]
    allowed = valid[:, None, None, :].expand(-1, 1, S, S)
    if causal:
        allowed = allowed & torch.ones(S, S, dtype=torch.bool, device=valid.device).tril()
    return allowed


def attention_probs(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """Softmax attention (B, H, S, S) float32; padded keys get 0, rows with no key are 0."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed_keys(valid, causal), float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def _normalise_over(score: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    score = score.masked_fill(~content, 0.0)
    return score / (score.sum(dim=1, keepdim=True) + EPS)


def iwtd_from_attention(
    attn: torch.Tensor,
    hidden: torch.Tensor,
    eligible: torch.Tensor,
    valid: torch.Tensor,
    anchor: torch.Tensor,
    folded: torch.Tensor,
    shift: torch.Tensor,
    p_min: float,
    p_max: float,
    seed,
    row_stride: int = 0,
):
    """docs/design.md §2 steps 1-7 on an explicit attention map.

    Returns ``(importance, drop_prob, drop_mask, keep_count, keep_order)`` with
    the dtypes and shapes of the fused backends.
    """
    B, _, S, _ = attn.shape
    positions = torch.arange(S, device=attn.device)
    is_anchor = positions[None, :] == anchor[:, None]
    content = valid & ~is_anchor
    elig = eligible & content

    # 1. anchor row, averaged over heads
    s1 = attn[torch.arange(B, device=attn.device), :, anchor].mean(dim=1)
    # 2. strongest other content key of each row (the row's softmax is over all keys)
    key_ok = content[:, None, None, :] & ~torch.eye(S, dtype=torch.bool, device=attn.device)
    s2 = attn.masked_fill(~key_ok, 0.0).amax(dim=-1).mean(dim=1)
    # 3. best bridge token's attention to each token (softmax over tokens)
    s3 = torch.softmax(bridge_logits(hidden.float(), folded, shift, valid), dim=-1).amax(dim=1)
    # 4. normalise each score over C and average
    importance = (_normalise_over(s1, content) + _normalise_over(s2, content) + _normalise_over(s3, content)) / 3.0
    # 5. min-max over C (a zero range counts as one)
    lo = importance.masked_fill(~content, float("inf")).amin(dim=1, keepdim=True)
    hi = importance.masked_fill(~content, float("-inf")).amax(dim=1, keepdim=True)
    span = hi - lo
    span = torch.where(span > 0, span, torch.ones_like(span))
    normalised = (importance - lo) / span
    # 6. important tokens drop less
    drop_prob = torch.where(elig, p_max - normalised * (p_max - p_min), torch.zeros_like(normalised))
    # 7. one Philox draw per (sample, token)
    drop_mask = elig & (token_uniform(seed, B, S, device=attn.device, row_stride=row_stride) < drop_prob)
    order, count = keep_order(valid & ~drop_mask)
    return importance, drop_prob, drop_mask, count, order


def iwtd_reference(q, k, hidden, eligible, valid, anchor, folded, shift, causal, p_min, p_max, seed, row_stride=0):
    """The reference backend: same arguments and outputs as the fused kernels."""
    attn = attention_probs(q, k, valid, causal)
    return iwtd_from_attention(attn, hidden, eligible, valid, anchor, folded, shift, p_min, p_max, seed, row_stride)
