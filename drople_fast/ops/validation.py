"""Argument checks for the IWTD op: each names the argument and the shapes seen."""
from __future__ import annotations

import torch


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _require_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _require_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_probabilities(p_min: float, p_max: float) -> None:
    for name, p in (("p_min", p_min), ("p_max", p_max)):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    if p_min > p_max:
        raise ValueError(f"p_min must not exceed p_max, got p_min={p_min} > p_max={p_max}")


def check_iwtd_args(q, k, hidden, eligible, bridge_tokens, bridge_weight, bridge_bias, anchor_index, valid,
                    p_min, p_max, check_values: bool = True) -> None:
    """Raise ValueError/TypeError for any malformed IWTD input.

    ``check_values=False`` skips the checks that read tensor values (anchor range, anchor on
    padding): each is a device-to-host sync, so callers that build the anchors themselves
    (the open_clip patch) skip them in the per-layer hot path.
    """
    named = dict(q=q, k=k, hidden=hidden, eligible=eligible, bridge_tokens=bridge_tokens,
                 bridge_weight=bridge_weight, bridge_bias=bridge_bias)
    if valid is not None:
        named["valid"] = valid
    for name, t in named.items():
        _require_tensor(name, t)
    for name in ("q", "k", "hidden", "bridge_tokens", "bridge_weight", "bridge_bias"):
        _require_float(name, named[name])
    expected_rank = dict(q=4, k=4, hidden=3, bridge_tokens=2, bridge_weight=2, bridge_bias=1)
    for name, rank in expected_rank.items():
        if named[name].dim() != rank:
            raise ValueError(f"{name} must have {rank} dimensions, got shape {_shape(named[name])}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape (B, H, S, Dh), got {_shape(q)} and {_shape(k)}")
    B, H, S, Dh = q.shape
    if hidden.shape[:2] != (B, S):
        raise ValueError(f"hidden must be (B, S, D) = ({B}, {S}, D) to match q {_shape(q)}, got {_shape(hidden)}")
    if S < 2:
        raise ValueError(f"IWTD needs at least 2 tokens (an anchor and content), got S={S} from q {_shape(q)}")
    M, P = bridge_tokens.shape
    # Empty dimensions make every score 0/0: refuse them by name rather than return NaN or garbage.
    for name, size, what in (("q", H, "H (heads)"), ("q", Dh, "Dh (head width)"), ("hidden", hidden.shape[2], "D"),
                             ("bridge_tokens", M, "M (bridge tokens)"), ("bridge_tokens", P, "P (bridge width)")):
        if size == 0:
            raise ValueError(f"{name} has {what} = 0 (shape {_shape(named[name])}); IWTD needs a non-empty {what}")
    if bridge_weight.shape != (P, hidden.shape[2]):
        raise ValueError(f"bridge_weight must be (P, D) = ({P}, {hidden.shape[2]}) to match bridge_tokens "
                         f"{_shape(bridge_tokens)} and hidden {_shape(hidden)}, got {_shape(bridge_weight)}")
    if bridge_bias.shape != (P,):
        raise ValueError(f"bridge_bias must be (P,) = ({P},), got {_shape(bridge_bias)}")
    if eligible.dtype != torch.bool:
        raise TypeError(f"eligible must be a bool tensor, got dtype {eligible.dtype}")
    if eligible.shape not in ((B, S), (S,)):
        raise ValueError(f"eligible must be (B, S) = ({B}, {S}) or (S,), got {_shape(eligible)}")
    if valid is not None:
        if valid.dtype != torch.bool:
            raise TypeError(f"valid must be a bool tensor, got dtype {valid.dtype}")
        if valid.shape != (B, S):
            raise ValueError(f"valid must be (B, S) = ({B}, {S}), got {_shape(valid)}")
    devices = {name: t.device for name, t in named.items()}
    if isinstance(anchor_index, torch.Tensor):
        devices["anchor_index"] = anchor_index.device
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n}={d}" for n, d in devices.items())
        raise ValueError(f"all IWTD tensors must be on one device, got {listing}")
    _check_anchor(anchor_index, B, S, valid, check_values)
    check_probabilities(p_min, p_max)


def _check_anchor(anchor_index, B: int, S: int, valid=None, check_values: bool = True) -> None:
    if isinstance(anchor_index, bool) or not isinstance(anchor_index, (int, torch.Tensor)):
        raise TypeError(f"anchor_index must be an int or an int64 tensor (B,), got {type(anchor_index).__name__}")
    if isinstance(anchor_index, int):
        if not 0 <= anchor_index < S:
            raise ValueError(f"anchor_index must be in [0, {S}), got {anchor_index}")
    else:
        if anchor_index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"anchor_index must be an integer tensor, got dtype {anchor_index.dtype}")
        if anchor_index.shape != (B,):
            raise ValueError(f"anchor_index must have shape (B,) = ({B},), got {_shape(anchor_index)}")
    if not check_values or torch.compiler.is_compiling() or B == 0:  # value checks need a host sync
        return
    if isinstance(anchor_index, torch.Tensor):
        lo, hi = int(anchor_index.min()), int(anchor_index.max())
        if lo < 0 or hi >= S:
            raise ValueError(f"anchor_index values must be in [0, {S}), got min {lo} max {hi}")
    if valid is not None:
        rows = torch.arange(B, device=valid.device)
        on_padding = ~valid[rows, torch.as_tensor(anchor_index, device=valid.device)]
        if bool(on_padding.any()):
            bad = on_padding.nonzero().flatten().tolist()
            raise ValueError(f"anchor_index points at padding (valid is False) for samples {bad}")
