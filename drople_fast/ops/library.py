"""torch.library registrations: fake implementations and the token gather op.

Fused IWTD backends share one schema (see :mod:`drople_fast.ops.backends`); their
fake (meta) implementation only needs shapes, so one function serves all.
The gather used by compaction is a custom op with a registered autograd
formula (backward = scatter into the kept positions, zero for dropped ones),
so ``torch.compile(fullgraph=True)`` traces it without a graph break.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

# --no-build-isolation: the extension must compile against the installed torch, not a fresh one pip fetches
REBUILD_COMMAND = "pip install --no-build-isolation -e ."
_CPP_ERROR: Optional[str] = None
_CPP_LOADED = False


def load_cpp_extension() -> None:
    """Import ``drople_fast._C`` (registers ``torch.ops.drople_fast.iwtd_cpu``)."""
    global _CPP_LOADED, _CPP_ERROR
    if _CPP_LOADED:
        return
    try:
        importlib.import_module("drople_fast._C")
    except (ImportError, OSError) as err:
        _CPP_ERROR = f"C++ extension drople_fast._C is not built ({err}); run `{REBUILD_COMMAND}`"
        raise RuntimeError(_CPP_ERROR) from err
    torch.library.register_fake("drople_fast::iwtd_cpu")(fused_fake)
    _CPP_LOADED = True


def cpp_extension_error() -> Optional[str]:
    try:
        load_cpp_extension()
    except RuntimeError:
        return _CPP_ERROR
    return None


def fused_fake(q, k, hidden, eligible, valid, anchor, folded, shift, causal, p_min, p_max, seed, row_stride=0):
    """Shapes and dtypes of a fused IWTD result, for tracing."""
    B, S = hidden.shape[0], hidden.shape[1]
    f32 = hidden.new_empty((B, S), dtype=torch.float32)
    return (
        f32,
        torch.empty_like(f32),
        hidden.new_empty((B, S), dtype=torch.bool),
        hidden.new_empty((B,), dtype=torch.int64),
        hidden.new_empty((B, S), dtype=torch.int64),
    )


# --------------------------------------------------------------------------
# gather / scatter of token rows
# --------------------------------------------------------------------------


@torch.library.custom_op("drople_fast::gather_tokens", mutates_args=())
def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``x[b, index[b, i]]`` of a (B, S, D) tensor; index -1 gives a zero row."""
    safe = index.clamp(min=0)
    out = torch.gather(x, 1, safe[..., None].expand(-1, -1, x.shape[-1]))
    return out * (index >= 0)[..., None].to(x.dtype)


@gather_tokens.register_fake
def _(x, index):
    return x.new_empty((x.shape[0], index.shape[1], x.shape[2]))


@torch.library.custom_op("drople_fast::scatter_tokens", mutates_args=())
def scatter_tokens(rows: torch.Tensor, index: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Inverse of :func:`gather_tokens`: put rows back at their positions, zeros elsewhere."""
    B, _, D = rows.shape
    out = rows.new_zeros((B, seq_len + 1, D))  # slot seq_len swallows the -1 padding
    target = torch.where(index >= 0, index, seq_len)
    out.scatter_add_(1, target[..., None].expand(-1, -1, D), rows)
    return out[:, :seq_len].contiguous()


@scatter_tokens.register_fake
def _(rows, index, seq_len):
    return rows.new_empty((rows.shape[0], seq_len, rows.shape[2]))


def _gather_setup(ctx, inputs, output):
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.seq_len = x.shape[1]


def _gather_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return scatter_tokens(grad.contiguous(), index, ctx.seq_len), None


def _scatter_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _scatter_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return gather_tokens(grad.contiguous(), index), None, None


gather_tokens.register_autograd(_gather_backward, setup_context=_gather_setup)
scatter_tokens.register_autograd(_scatter_backward, setup_context=_scatter_setup)
