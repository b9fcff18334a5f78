"""Residual attention blocks of open_clip run on memory-efficient attention.

:func:`block_forward` computes exactly what ``ResidualAttentionBlock.forward``
computes, with the block's own weights, but through
``scaled_dot_product_attention`` (or xformers on CUDA), with an optional
key-padding/causal mask, and can hand back the layer's q and k for IWTD.
Padding is skipped where possible: the text tower uses ``is_causal`` with no mask,
and a padded batch runs packed variable-length attention on CUDA (torch's
``varlen_attn`` or xformers' block-diagonal masks), padded SDPA elsewhere.
"""
from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import attention_dispatch


def xformers_unavailable(device: torch.device) -> Optional[str]:
    """None if xformers' memory_efficient_attention can run on ``device``, else why not."""
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    if device.type != "cuda":
        return f"xformers memory_efficient_attention is CUDA-only, inputs are on {device.type}"
    return None


@dataclass(frozen=True)
class Layout:
    """How one layer's attention sees the batch.

    ``valid``: (B, S) bool, False for padding (None: no padding). Valid tokens are always a
    prefix of each row (compaction keeps order, prompts go in at position 1), which is what
    makes the cheaper paths below exact. ``causal``: the text tower. ``lengths``: the
    per-sample valid lengths as host ints, when known without a sync (packed attention needs
    them). ``rows``: flat indices (into B * S) of the valid rows.
    """

    valid: Optional[torch.Tensor] = None
    causal: bool = False
    lengths: Optional[tuple[int, ...]] = None
    rows: Optional[torch.Tensor] = None

    def padded_mask(self) -> Optional[torch.Tensor]:
        """The SDPA mask of the padded path: None wherever ``is_causal`` alone is exact.

        Text: every valid query's keys (k <= j) are valid because valid tokens are a prefix, so a
        causal mask with no padding mask gives the same valid rows (and lets SDPA use flash, which
        refuses explicit masks). Padded rows differ, but nothing reads them.
        """
        if self.valid is None or self.causal:
            return None
        return self.valid[:, None, None, :]


def _xformers_attention(q, k, v, mask, causal: bool = False):
    """Padded xformers attention: no bias, a causal bias object, or (unknown lengths only) a dense bias."""
    import xformers.ops as xops

    bias = None
    if mask is not None:
        B, Sq, Sk = q.shape[0], q.shape[2], k.shape[2]
        mask = mask & torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril() if causal else mask
        # xformers wants the bias' last dimension padded to a multiple of 8.
        padded = (Sk + 7) // 8 * 8
        storage = q.new_zeros(B, q.shape[1], Sq, padded)
        bias = storage[..., :Sk]
        bias.masked_fill_(~mask.expand(B, q.shape[1], Sq, Sk), float("-inf"))
    elif causal:
        bias = xops.LowerTriangularMask()
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


def attend(q, k, v, mask, kernel: str = "sdpa", causal: bool = False):
    """Softmax attention on (B, H, S, Dh) with a bool mask (True = attend) and/or a causal mask."""
    if kernel == "xformers":
        reason = xformers_unavailable(q.device)
        if reason:
            raise ValueError(f"attention='xformers' cannot run here: {reason}; use attention='sdpa'")
        return _xformers_attention(q, k, v, mask, causal)
    if causal and mask is not None:
        mask = mask & torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()
        causal = False
    # "sdpa": the implementation the measured table picks for this device, dtype and shape
    return attention_dispatch.attention(q, k, v, mask, causal)


# --------------------------------------------------------------------------
# packed (variable-length) attention over the valid rows only
# --------------------------------------------------------------------------


def _varlen_attn():
    """torch.nn.attention.varlen.varlen_attn where this torch has it (it is not in every torch >= 2.11)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def packed_kernel(kernel: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """The packed attention that runs here: "xformers" (block-diagonal masks), "varlen" (torch's flash
    varlen kernel: CUDA, fp16/bf16) or None (the padded SDPA path, e.g. on the CPU)."""
    if device.type != "cuda":
        return None
    if kernel == "xformers":
        return "xformers"
    if dtype in (torch.float16, torch.bfloat16) and _varlen_attn() is not None:
        return "varlen"
    return None


def _varlen_causal_kwargs(fn, causal: bool) -> dict:
    if not causal:
        return {}
    params = inspect.signature(fn).parameters
    if "window_size" in params:  # torch >= 2.10: (-1, 0) is causal
        return {"window_size": (-1, 0)}
    return {"is_causal": True}  # the first releases of varlen_attn


def packed_attention(kind: str, q, k, v, layout: Layout):
    """Attention on packed rows (T, H, Dh) of sequences of ``layout.lengths`` (in order), (T, H, Dh) out."""
    lengths = list(layout.lengths)
    if kind == "xformers":
        import xformers.ops as xops
        from xformers.ops import fmha

        mask_type = fmha.attn_bias.BlockDiagonalCausalMask if layout.causal else fmha.attn_bias.BlockDiagonalMask
        bias = mask_type.from_seqlens(lengths, device=q.device)
        return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
    fn = _varlen_attn()
    # cumulative lengths from the device-side mask: no host-to-device copy in the hot path
    cu = F.pad(layout.valid.sum(dim=1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    longest = max(lengths)
    return fn(q, k, v, cu, cu, longest, longest, **_varlen_causal_kwargs(fn, layout.causal))


def pad_rows(real: torch.Tensor, rows: torch.Tensor, total: int) -> torch.Tensor:
    """(T, C) valid rows -> (total, C) with zeros elsewhere (``rows``: their flat indices).

    In place into a fresh zero buffer: the out-of-place ``index_copy`` would clone the zeros first.
    """
    return real.new_zeros(total, real.shape[1]).index_copy_(0, rows, real)


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


def block_forward(block, x: torch.Tensor, layout: Optional[Layout] = None, kernel: str = "sdpa",
                  return_qk: bool = False):
    """One open_clip ``ResidualAttentionBlock`` on (B, S, D); returns x or (x, q, k).

    Mirrors open_clip 3.3.0 ``ResidualAttentionBlock.forward`` (self-attention: ``x + ls_1(attn(ln_1(x)))``,
    then ``x + ls_2(mlp(ln_2(x)))``); differs in: q/k/v are projected with ``attn.in_proj_weight`` directly
    (plus an attached adapter's term, see :func:`in_proj`) and attended by SDPA / xformers with a bool
    mask instead of ``nn.MultiheadAttention`` with a float mask (same math; open_clip's attention has
    no dropout), q and k can be handed back for IWTD, and ``layout`` (below) skips padding.

    With ``layout.rows`` (a padded batch) every per-token layer (projections, MLP: most of the
    FLOPs) runs on the valid rows only, and padded rows come out zero. The attention then runs
    on the packed rows too where a packed kernel exists and the lengths are known
    (:func:`packed_kernel`), else on the padded layout with SDPA.
    """
    layout = layout if layout is not None else Layout()
    if layout.rows is None:
        q, k, v = qkv(block, x)
        if return_qk:  # as below
            q, k = q.contiguous(), k.contiguous()
        out = _attention_out(block, attend(q, k, v, layout.padded_mask(), kernel, layout.causal))
        x = x + block.ls_1(out)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return (x, q, k) if return_qk else x
    B, S, D = x.shape
    H = block.attn.num_heads
    rows = layout.rows
    real = x.reshape(B * S, D).index_select(0, rows)
    packed = in_proj(block.attn, block.ln_1(real))
    kind = packed_kernel(kernel, x.device, packed.dtype) if layout.lengths is not None else None
    q = k = None
    if kind is not None:
        pq, pk, pv = packed.view(-1, 3, H, D // H).unbind(1)
        attended = packed_attention(kind, pq, pk, pv, layout).reshape(-1, D)
    if kind is None or return_qk:  # the padded layout: for SDPA, or for IWTD's (B, H, S, Dh) q and k
        padded = pad_rows(packed, rows, B * S)
        q, k, v = padded.view(B, S, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        if return_qk:  # the IWTD op reads them contiguous: one copy each, which the attention reads too
            q, k = q.contiguous(), k.contiguous()
    if kind is None:
        out = attend(q, k, v, layout.padded_mask(), kernel, layout.causal)
        attended = out.transpose(1, 2).reshape(B * S, D).index_select(0, rows)
    real = real + block.ls_1(F.linear(attended, block.attn.out_proj.weight, block.attn.out_proj.bias))
    real = real + block.ls_2(block.mlp(block.ln_2(real)))
    x = pad_rows(real, rows, B * S).view(B, S, D)
    return (x, q, k) if return_qk else x


def anchor_block_forward(block, x: torch.Tensor, anchor: torch.Tensor, layout: Optional[Layout] = None,
                         kernel: str = "sdpa") -> torch.Tensor:
    """A tower's last block for the one row per sample its pooling reads: (B, S, D) in, (B, D) out.

    Equals ``block_forward(block, x, layout)[arange(B), anchor]``: keys and values come from every
    valid token (``layout.rows`` as in :func:`block_forward`), but only the anchors' queries attend
    (causal: to the keys up to the anchor) and the output projection and MLP -- two thirds of a
    block's FLOPs -- run on B rows instead of every token.
    """
    layout = layout if layout is not None else Layout()
    B, S, D = x.shape
    H = block.attn.num_heads
    if layout.rows is None:
        packed = in_proj(block.attn, block.ln_1(x))
    else:
        real = in_proj(block.attn, block.ln_1(x.reshape(B * S, D).index_select(0, layout.rows)))
        packed = pad_rows(real, layout.rows, B * S)
    qkv = packed.view(B, S, 3, H, D // H)
    batch = torch.arange(B, device=x.device)
    q = qkv[batch, anchor, 0][:, :, None]  # (B, H, 1, Dh)
    k, v = qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
    keys = torch.ones(B, S, dtype=torch.bool, device=x.device) if layout.valid is None else layout.valid
    if layout.causal:
        keys = keys & (torch.arange(S, device=x.device)[None, :] <= anchor[:, None])
    mask = keys[:, None, None, :]
    if kernel == "xformers":
        out = attend(q, k, v, mask, kernel)
    else:  # the implementation the table picks for the tower's full problem, as in its other blocks
        out = attention_dispatch.attention(q, k, v, mask, False, impl=attention_dispatch.choose(k, None, layout.causal))
    out = out.reshape(B, D)
    rows = x[batch, anchor] + block.ls_1(F.linear(out, block.attn.out_proj.weight, block.attn.out_proj.bias))
    return rows + block.ls_2(block.mlp(block.ln_2(rows)))


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
