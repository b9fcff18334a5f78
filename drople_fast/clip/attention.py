"""Residual attention blocks of open_clip run on memory-efficient attention.

:func:`block_forward` computes exactly what ``ResidualAttentionBlock.forward``
computes, with the block's own weights, but through
``scaled_dot_product_attention`` (or xformers on CUDA), with an optional
key-padding/causal mask, and can hand back the layer's q and k for IWTD.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

def xformers_unavailable(device: torch.device) -> Optional[str]:
    """None if xformers' memory_efficient_attention can run on ``device``, else why not."""
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    if device.type != "cuda":
        return f"xformers memory_efficient_attention is CUDA-only, inputs are on {device.type}"
    return None


def attention_mask(valid: Optional[torch.Tensor], causal: bool, S: int, device) -> Optional[torch.Tensor]:
    """Bool (B, 1, S, S) mask, True where a query may attend to a key; None if nothing is masked."""
    if valid is None and not causal:
        return None
    mask = torch.ones(1, 1, S, S, dtype=torch.bool, device=device)
    if causal:
        mask = mask.tril()
    if valid is not None:
        mask = mask & valid[:, None, None, :]
    return mask


def _xformers_attention(q, k, v, mask):
    import xformers.ops as xops

    bias = None
    if mask is not None:
        B, _, S, _ = mask.shape
        # xformers wants the bias' last dimension padded to a multiple of 8.
        padded = (S + 7) // 8 * 8
        storage = q.new_zeros(B, q.shape[1], S, padded)
        bias = storage[..., :S]
        bias.masked_fill_(~mask.expand(B, q.shape[1], S, S), float("-inf"))
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


def attend(q, k, v, mask, kernel: str = "sdpa"):
    """Softmax attention on (B, H, S, Dh) with a bool mask (True = attend)."""
    if kernel == "xformers":
        reason = xformers_unavailable(q.device)
        if reason:
            raise ValueError(f"attention='xformers' cannot run here: {reason}; use attention='sdpa'")
        return _xformers_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


ADAPTER_ATTR = "_drople_lora"


def in_proj(attn, h: torch.Tensor) -> torch.Tensor:
    """The packed (..., 3D) q/k/v projection of the normalised input ``h``.

    An adapter attached as ``attn.__dict__[ADAPTER_ATTR]`` (the learner's LoRA) adds its own
    term computed from ``h``; it is not folded into the weight because LoRA's dropout acts on
    the input (peft: ``B(A(dropout(h))) * scale``).
    """
    packed = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    adapter = attn.__dict__.get(ADAPTER_ATTR)
    if adapter is not None and adapter.enabled:
        packed = packed + adapter(h).to(packed.dtype)
    return packed


def qkv(block, x: torch.Tensor):
    """The block's q, k, v as (B, H, S, Dh) from its pre-norm input."""
    attn = block.attn
    B, S, D = x.shape
    H = attn.num_heads
    packed = in_proj(attn, block.ln_1(x))
    q, k, v = packed.view(B, S, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def block_forward(block, x: torch.Tensor, mask: Optional[torch.Tensor], kernel: str = "sdpa",
                  return_qk: bool = False, rows: Optional[torch.Tensor] = None):
    """One open_clip ``ResidualAttentionBlock`` on (B, S, D); returns x or (x, q, k).

    Mirrors open_clip 3.3.0 ``ResidualAttentionBlock.forward`` (self-attention: ``x + ls_1(attn(ln_1(x)))``,
    then ``x + ls_2(mlp(ln_2(x)))``); differs in: q/k/v are projected with ``attn.in_proj_weight`` directly
    (plus an attached adapter's term, see :func:`in_proj`) and attended by SDPA / xformers with a bool
    mask instead of ``nn.MultiheadAttention`` with a float mask (same math; open_clip's attention has
    no dropout), q and k can be handed back for IWTD, and ``rows`` (below) skips padded rows.

    ``rows``: flat indices (into B * S) of the real tokens of a padded batch. Every
    per-token layer (projections, MLP: most of the FLOPs) then runs on those rows
    only and just the attention sees the padded layout; padded rows come out zero.
    """
    if rows is None:
        q, k, v = qkv(block, x)
        out = _attention_out(block, attend(q, k, v, mask, kernel))
        x = x + block.ls_1(out)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return (x, q, k) if return_qk else x
    B, S, D = x.shape
    real = x.reshape(B * S, D).index_select(0, rows)
    packed = in_proj(block.attn, block.ln_1(real))
    padded = packed.new_zeros(B * S, 3 * D).index_copy(0, rows, packed)
    H = block.attn.num_heads
    q, k, v = padded.view(B, S, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
    attended = attend(q, k, v, mask, kernel).transpose(1, 2).reshape(B * S, D).index_select(0, rows)
    real = real + block.ls_1(F.linear(attended, block.attn.out_proj.weight, block.attn.out_proj.bias))
    real = real + block.ls_2(block.mlp(block.ln_2(real)))
    x = real.new_zeros(B * S, D).index_copy(0, rows, real).view(B, S, D)
    return (x, q, k) if return_qk else x


def _attention_out(block, out: torch.Tensor) -> torch.Tensor:
    B, H, S, Dh = out.shape
    return F.linear(out.transpose(1, 2).reshape(B, S, H * Dh), block.attn.out_proj.weight, block.attn.out_proj.bias)


def check_block(block, where: str) -> None:
    """Refuse blocks whose attention is not the standard packed-projection multi-head attention."""
    attn = getattr(block, "attn", None)
    if attn is None or not hasattr(attn, "in_proj_weight") or attn.in_proj_weight is None:
        raise ValueError(f"{where}: unsupported block {type(block).__name__}; drople_fast patches open_clip "
                         "ResidualAttentionBlocks with packed q/k/v projections")
    if hasattr(block, "ln_1_kv"):
        raise ValueError(f"{where}: cross-attention blocks are not supported")
    if not getattr(attn, "batch_first", True):
        raise ValueError(f"{where}: attention must be batch_first")
    # open_clip's newer Attention module (CustomResidualAttentionBlock): same weight names, and the
    # same computation unless one of its optional extras is switched on.
    extras = {
        "qk_norm": not isinstance(getattr(attn, "ln_q", torch.nn.Identity()), torch.nn.Identity),
        "scaled_cosine": getattr(attn, "logit_scale", None) is not None,
        "scale_heads": getattr(attn, "head_scale", None) is not None,
        "inner_norm": not isinstance(getattr(attn, "ln_inner", torch.nn.Identity()), torch.nn.Identity),
        "scale_attn": not isinstance(getattr(block, "ln_attn", torch.nn.Identity()), torch.nn.Identity),
    }
    used = [name for name, on in extras.items() if on]
    if used:
        raise ValueError(f"{where}: attention extras {used} are not supported (plain multi-head attention only)")
