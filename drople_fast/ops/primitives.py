"""The pieces every IWTD backend and the reference share: the bridge algebra and the keep order.

They live here, not in :mod:`.reference`, so that the production path never
imports the oracle.
"""
from __future__ import annotations

import torch


def fold_bridge(bridge_tokens: torch.Tensor, bridge_weight: torch.Tensor, bridge_bias: torch.Tensor):
    """``T (W h + b) = (T W) h + T b``: fold the bridge map into the tokens (M x D) and a shift (M,)."""
    tokens = bridge_tokens.float()
    return tokens @ bridge_weight.float(), tokens @ bridge_bias.float()


def bridge_logits(hidden: torch.Tensor, folded: torch.Tensor, shift: torch.Tensor, valid: torch.Tensor):
    """(B, M, S) alignment logits ``(T W) h + T b`` with padding at -inf (tau = 1, no 1/sqrt(d))."""
    logits = torch.einsum("md,bsd->bms", folded, hidden) + shift[None, :, None]
    return logits.masked_fill(~valid[:, None, :], float("-inf"))


def bridge_features(hidden, bridge_tokens, bridge_weight, bridge_bias, valid):
    """Differentiable pooled bridge features ``F = G (W h + b)`` of shape (B, M, P).

    Rows of G sum to one, so ``G (W h + b) = (G h) W^T + b``. Computed in the wider of
    the hidden and bridge dtypes (an fp32 bridge on a bf16/fp16 model upcasts the hidden
    states explicitly), so gradients reach the tokens, the map and the hidden states;
    under autocast the matmuls run in autocast's dtype as usual.
    """
    dtype = torch.promote_types(hidden.dtype, bridge_weight.dtype)
    hidden, bridge_tokens = hidden.to(dtype), bridge_tokens.to(dtype)
    bridge_weight, bridge_bias = bridge_weight.to(dtype), bridge_bias.to(dtype)
    # Fold the map into the tokens first: M x D instead of S x D x P per sample.
    logits = bridge_logits(hidden, bridge_tokens @ bridge_weight, bridge_tokens @ bridge_bias, valid)
    # Softmax in at least float32 (low-precision inputs), in float64 when given float64.
    gate = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    return (gate.to(dtype) @ hidden) @ bridge_weight.t() + bridge_bias


def keep_order(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions moved to the front in original order, -1 after; and the counts.

    A stable sort on ``~keep`` is the prefix-sum compaction of docs/design.md §3.
    """
    S = keep.shape[1]
    positions = torch.arange(S, device=keep.device).expand_as(keep)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    order = torch.where(torch.gather(keep, 1, order), torch.gather(positions, 1, order), -1)
    return order, keep.sum(dim=1)

