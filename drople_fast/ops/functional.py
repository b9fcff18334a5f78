"""Public functional API: :func:`iwtd`, :func:`compact`, :func:`compact_fixed`."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

from . import library
from .backends import select_backend
from .philox import gumbel_seed, token_uniform
from .primitives import bridge_features, fold_bridge, keep_order
from .validation import check_iwtd_args


DROP_FULLGRAPH = ("drople_fast: mode 'drop' compacts to data-dependent widths, which torch.compile(fullgraph=True) "
                  "cannot trace: use drop_fixed for fullgraph (compact_fixed, IWTDConfig(mode='drop_fixed'))")


def break_for_data_dependent_width() -> None:
    """Under torch.compile, break the graph here with :data:`DROP_FULLGRAPH` as the reason, so fullgraph=True
    fails naming the way out rather than in a symbolic-shape guard deep in attention; eager: nothing."""
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break(msg=DROP_FULLGRAPH)


class IWTDOutput(NamedTuple):
    """Result of one IWTD step. All (B, S) tensors are indexed by original position."""

    importance: torch.Tensor  # (B, S) float32: I_j on content tokens, 0 at the anchor and padding
    drop_prob: torch.Tensor  # (B, S) float32: p_j on eligible tokens, 0 elsewhere
    drop_mask: torch.Tensor  # (B, S) bool
    keep_count: torch.Tensor  # (B,) int64: valid tokens not dropped
    keep_order: torch.Tensor  # (B, S) int64: kept positions first, in order, then -1 (static shape)
    valid: torch.Tensor  # (B, S) bool
    eligible: torch.Tensor  # (B, S) bool: the eligible set E actually used
    bridge_inputs: tuple = ()  # (hidden, bridge_tokens, bridge_weight, bridge_bias), for bridge_features

    @property
    def bridge_features(self) -> torch.Tensor:
        """(B, M, P) pooled bridge features ``F = G (W h + b)`` for the alignment loss.

        Computed on access (differentiable with respect to the hidden states and the
        bridge module), so a caller that never reads them does not pay for them;
        keep the tensor if you need it twice.
        """
        if not self.bridge_inputs:
            raise ValueError("this IWTDOutput was built without bridge inputs")
        return bridge_features(*self.bridge_inputs, self.valid)

    @property
    def keep_index(self) -> torch.Tensor:
        """(B, max keep_count) kept positions in original order, padded with -1 (data-dependent width)."""
        break_for_data_dependent_width()
        width = int(self.keep_count.max()) if self.keep_count.numel() else 0
        return self.keep_order[:, :width]


class BridgeInputs(NamedTuple):
    """What the alignment loss reads of an IWTD layer whose drop decisions nothing reads (the layer's
    hidden states, their valid mask and the bridge): the same ``bridge_features`` as its IWTDOutput."""

    valid: torch.Tensor  # (B, S) bool
    bridge_inputs: tuple  # (hidden, bridge_tokens, bridge_weight, bridge_bias)

    @property
    def bridge_features(self) -> torch.Tensor:
        return bridge_features(*self.bridge_inputs, self.valid)


class Compacted(NamedTuple):
    """A gathered batch of kept tokens."""

    tokens: torch.Tensor  # (B, K, D)
    valid: torch.Tensor  # (B, K) bool: True for real tokens, False for padding (the key-padding mask)
    index: torch.Tensor  # (B, K) int64: original position of each row, -1 for padding


def _seed_tensor(seed: Union[int, torch.Tensor], device: torch.device) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"seed must be an int or a one-element int64 tensor, got {seed.dtype} {tuple(seed.shape)}")
        return seed.reshape(1).to(device)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a one-element int64 tensor, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must fit in int64, got {seed}")
    return torch.tensor([seed], dtype=torch.int64, device=device)


def nonfinite_samples(q, k, hidden, valid, folded, shift) -> torch.Tensor:
    """(B,) bool: samples with a NaN/inf in q, k or hidden at a valid token, or any in the bridge.

    Detected from per-token float32 sums (a NaN or inf anywhere makes its sum non-finite; so does a
    finite value so large that the sum overflows, which would overflow the attention logits anyway).
    Device-side only: no host synchronisation.
    """
    # the contiguous last dimension first: 3x faster than one reduction over (H, Dh) on the CPU
    per_token = (q.sum(dim=3, dtype=torch.float32).sum(dim=1) + k.sum(dim=3, dtype=torch.float32).sum(dim=1)
                 + hidden.sum(dim=2, dtype=torch.float32))
    bridge = folded.sum(dtype=torch.float32) + shift.sum(dtype=torch.float32)
    return (~torch.isfinite(per_token) & valid).any(dim=1) | ~torch.isfinite(bridge)


def _nonfinite_rule(bad, valid, importance, drop_prob, drop_mask, keep_count, keep_order_):
    """THE behaviour for non-finite input, the same whatever the backend computed: a sample with a
    non-finite input is left untouched (importance 0, drop probability 0, nothing dropped, every
    valid token kept). Its forward is non-finite anyway; the trainer stops on the non-finite loss."""
    rows = bad[:, None]
    all_order, all_count = keep_order(valid)
    zero = torch.zeros((), dtype=importance.dtype, device=importance.device)
    return (torch.where(rows, zero, importance), torch.where(rows, zero, drop_prob), drop_mask & ~rows,
            torch.where(bad, all_count.to(keep_count.dtype), keep_count),
            torch.where(rows, all_order.to(keep_order_.dtype), keep_order_))


def iwtd(
    q: torch.Tensor,
    k: torch.Tensor,
    hidden: torch.Tensor,
    eligible: torch.Tensor,
    bridge_tokens: torch.Tensor,
    bridge_weight: torch.Tensor,
    bridge_bias: torch.Tensor,
    anchor_index: Union[int, torch.Tensor],
    valid: Optional[torch.Tensor] = None,
    causal: bool = False,
    p_min: float = 0.1,
    p_max: float = 0.5,
    seed: Union[int, torch.Tensor] = 0,
    backend: Optional[str] = None,
    row_stride: int = 0,
    check_values: bool = True,
) -> IWTDOutput:
    """Importance-weighted token dropout for one layer (docs/design.md §2).

    ``q``, ``k``: (B, H, S, Dh) attention inputs of the layer; ``hidden``:
    (B, S, D) its output; ``eligible``: bool (B, S) or (S,); ``bridge_*``: the
    alignment module (M, P), (P, D), (P,); ``anchor_index``: int or (B,)
    (CLS = 0, text EOS); ``valid``: bool (B, S), False for padding;
    ``causal``: text tower; ``seed``: int or int64 tensor; ``backend``: None
    (best usable), "reference", "cpp" or "triton"; ``row_stride``: Philox
    offsets are ``b * row_stride + j`` (0 means S; the text tower passes its
    untrimmed width so EOS trimming does not change the draws); ``check_values``: False
    skips the anchor value checks (host syncs) for callers that built the anchors themselves.

    The mask is drawn with Philox at offset ``b * row_stride + j``, so every backend
    returns the same ``drop_mask`` for the same seed. A sample with a NaN or inf in
    ``q``, ``k`` or ``hidden`` (at a valid token) or in the bridge is left untouched
    on every backend: nothing dropped, probabilities and importance 0
    (:func:`nonfinite_samples`; checked on the device, no host sync). ``bridge_features`` is
    computed when read, differentiable with respect to the hidden states and
    the bridge module.
    """
    check_iwtd_args(q, k, hidden, eligible, bridge_tokens, bridge_weight, bridge_bias, anchor_index, valid,
                    p_min, p_max, check_values)
    B, _, S, _ = q.shape
    if isinstance(row_stride, bool) or not isinstance(row_stride, int) or not (row_stride == 0 or row_stride >= S):
        raise ValueError(f"row_stride must be 0 (meaning S) or an int >= S={S}, got {row_stride!r}")
    device = q.device
    eligible = eligible.expand(B, S).contiguous()
    valid = torch.ones(B, S, dtype=torch.bool, device=device) if valid is None else valid.contiguous()
    if isinstance(anchor_index, int):
        anchor = torch.full((B,), anchor_index, dtype=torch.int64, device=device)
    else:
        anchor = anchor_index.to(torch.int64).contiguous()
    # Autocast off: the scores are float32 math on every backend (DESIGN §3), whatever the caller's
    # autocast would make of the matmuls; low-precision q/k/hidden are read as they are.
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        folded, shift = fold_bridge(bridge_tokens, bridge_weight, bridge_bias)
        fused = select_backend(backend, device, q.dtype)
        # one contiguous copy of each, read by the fused op and the finiteness check alike
        qd, kd, hd = q.detach().contiguous(), k.detach().contiguous(), hidden.detach().contiguous()
        importance, drop_prob, drop_mask, keep_count, keep_order = fused(
            qd, kd, hd, eligible, valid, anchor, folded.contiguous(), shift.contiguous(),
            bool(causal), float(p_min), float(p_max), _seed_tensor(seed, device), int(row_stride),
        )
        importance, drop_prob, drop_mask, keep_count, keep_order = _nonfinite_rule(
            nonfinite_samples(qd, kd, hd, valid, folded, shift), valid,
            importance, drop_prob, drop_mask, keep_count, keep_order)
    content = valid & (torch.arange(S, device=device)[None, :] != anchor[:, None])
    return IWTDOutput(importance, drop_prob, drop_mask, keep_count, keep_order, valid, eligible & content,
                      (hidden, bridge_tokens, bridge_weight, bridge_bias))


def compact(hidden: torch.Tensor, out: IWTDOutput) -> Compacted:
    """Gather the kept tokens into a padded batch (B, max keep, D) with its key-padding mask.

    Backward scatters gradients to the kept positions; dropped positions get zero.
    """
    index = out.keep_index
    return Compacted(library.gather_tokens(hidden, index), index >= 0, index)


def fixed_budget_index(out: IWTDOutput, keep: int, num_always: int, seed: Union[int, torch.Tensor] = 0,
                       row_stride: int = 0, check_values: bool = True):
    """(B, keep + num_always) positions: all valid non-eligible tokens plus exactly ``keep`` eligible ones.

    Eligible tokens are sampled without replacement in proportion to their keep
    probability ``1 - p`` (Gumbel-top-k on ``log(1 - p)`` with Philox noise on its
    own stream), so shapes are static for torch.compile and CUDA graphs.
    Positions are returned in original order; -1 where a sample has too few tokens.
    ``check_values=False`` skips the check of ``num_always`` against the data (a host sync), for
    callers that know it from the layout.
    """
    for name, value in (("keep", keep), ("num_always", num_always)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    B, S = out.drop_prob.shape
    width = keep + num_always
    if not 0 <= width <= S:
        raise ValueError(f"keep + num_always must be in [0, S={S}], got keep={keep} num_always={num_always}")
    seed_t = _seed_tensor(seed, out.drop_prob.device)
    uniform = token_uniform(gumbel_seed(seed_t), B, S, row_stride=row_stride).clamp(min=1e-20)
    gumbel = -torch.log(-torch.log(uniform))
    log_keep = torch.log((1.0 - out.drop_prob).clamp(min=1e-30))
    score = torch.where(out.eligible, log_keep + gumbel, torch.full_like(gumbel, -math.inf))
    # Rank eligible tokens within each sample; the best `keep` survive whatever the always-kept count.
    rank = torch.argsort(torch.argsort(score, dim=1, descending=True, stable=True), dim=1)
    always = out.valid & ~out.eligible
    kept = always | (out.eligible & (rank < keep))
    if check_values and not torch.compiler.is_compiling():
        most = int(always.sum(dim=1).max()) if B else 0
        if most > num_always:
            raise ValueError(f"num_always={num_always} but a sample has {most} valid non-eligible tokens")
    order, _ = keep_order(kept)
    return order[:, :width]


def compact_fixed(hidden: torch.Tensor, out: IWTDOutput, keep: int, num_always: Optional[int] = None,
                  seed: Union[int, torch.Tensor] = 0, row_stride: int = 0, check_values: bool = True) -> Compacted:
    """Fixed-budget compaction: exactly ``keep`` eligible tokens per sample, static shapes.

    ``num_always`` is the number of valid non-eligible tokens per sample (the
    anchor, class-name tokens, ...). Pass it when compiling; if omitted it is
    read from the data, which needs a host sync.
    """
    if num_always is None:
        num_always = int((out.valid & ~out.eligible).sum(dim=1).max())
    index = fixed_budget_index(out, keep, num_always, seed, row_stride, check_values)
    return Compacted(library.gather_tokens(hidden, index), index >= 0, index)
