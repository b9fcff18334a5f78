"""Attention that skips padding: text via is_causal with no mask, packed (varlen / xformers block-diagonal)
attention for padded batches on CUDA, the padded SDPA path as the CPU fallback, xformers' CPU refusal.

The packed kernels are CUDA-only; on the CPU their plumbing (packing the valid rows, sequence
lengths, cumulative offsets, causal flag, q/k handed to IWTD) is tested by standing in a CPU
emulation of the kernel and comparing the patched model against the padded path.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import drople_fast as df
from drople_fast.clip import attention
from drople_fast.clip.attention import Layout, block_forward, packed_kernel
from drople_fast.training.tiny_clip import create_tiny_clip

HAS_XFORMERS = importlib.util.find_spec("xformers") is not None


def _padded_batch(B=3, S=7, D=64, lengths=(7, 4, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, D, generator=g)
    valid = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]
    x = x * valid[..., None]
    rows = valid.reshape(-1).nonzero().squeeze(1)
    return x, valid, rows, tuple(lengths)


def test_packed_kernel_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert packed_kernel("sdpa", cpu, torch.bfloat16) is None  # CPU: the padded path
    assert packed_kernel("sdpa", cuda, torch.float32) is None  # flash varlen needs fp16/bf16
    assert packed_kernel("xformers", cuda, torch.float32) == "xformers"
    want = "varlen" if attention._varlen_attn() is not None else None
    assert packed_kernel("sdpa", cuda, torch.bfloat16) == want


@pytest.mark.parametrize("causal", [False, True])
def test_padded_mask_matches_the_explicit_mask_on_valid_rows(causal):
    # Valid tokens are a prefix, so text's is_causal alone (no mask) gives the same valid rows.
    block = create_tiny_clip(seed=0).transformer.resblocks[0]
    x, valid, rows, lengths = _padded_batch()
    layout = Layout(valid=valid, causal=causal, lengths=lengths)
    assert (layout.padded_mask() is None) == causal
    got = block_forward(block, x, layout)
    S = x.shape[1]
    explicit = valid[:, None, None, :] & (torch.ones(S, S, dtype=torch.bool).tril() if causal else True)
    q, k, v = attention.qkv(block, x)
    out = attention._attention_out(block, F.scaled_dot_product_attention(q, k, v, attn_mask=explicit))
    want = x + block.ls_1(out)
    want = want + block.ls_2(block.mlp(block.ln_2(want)))
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)


def _emulated_varlen(calls):
    """CPU stand-in for torch.nn.attention.varlen.varlen_attn: per-sequence SDPA between cu offsets."""

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), **_):
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
        causal = tuple(window_size) == (-1, 0)
        calls.append((tuple(cu_q.tolist()), max_q, causal))
        out = torch.empty_like(q)
        bounds = cu_q.tolist()
        assert max_q == max(b - a for a, b in zip(bounds, bounds[1:]))
        for a, b in zip(bounds, bounds[1:]):
            seq = lambda t: t[a:b].transpose(0, 1)[None]  # noqa: E731  (1, H, L, Dh)
            out[a:b] = F.scaled_dot_product_attention(seq(q), seq(k), seq(v), is_causal=causal)[0].transpose(0, 1)
        return out

    return varlen_attn


def _train_forward(model, x, text):
    model.train()
    return model.encode_image(x), model.encode_text(text)


def _tiny_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=g)
    text = torch.zeros(3, 77, dtype=torch.int64)
    text[:, 0], text[:, 1:6], text[0, 6], text[1, 9], text[2, 4] = 49406, 320, 49407, 49407, 49407
    text[1, 6:9] = 1000
    return x, text


@pytest.mark.parametrize("mode", ["drop", "drop_fixed"])
def test_varlen_path_matches_padded_path(monkeypatch, mode):
    x, text = _tiny_inputs()
    want = _train_forward(df.apply(create_tiny_clip(seed=0), df.IWTDConfig(mode=mode, backend="reference")), x, text)
    calls = []
    monkeypatch.setattr(attention, "_varlen_attn", lambda: _emulated_varlen(calls))
    monkeypatch.setattr(attention, "packed_kernel", lambda kernel, device, dtype: "varlen")
    got = _train_forward(df.apply(create_tiny_clip(seed=0), df.IWTDConfig(mode=mode, backend="reference")), x, text)
    assert calls, "the packed path never ran"
    assert any(causal for _, _, causal in calls)  # text
    # vision: padded only after a data-dependent compaction ("drop"); drop_fixed keeps it dense
    assert any(not causal for _, _, causal in calls) == (mode == "drop")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not HAS_XFORMERS, reason="xformers is not installed")
def test_xformers_block_diagonal_path_matches_padded_path(monkeypatch):
    import xformers.ops as xops

    seen = []

    def emulated(q, k, v, attn_bias=None, **_):  # (1, T, H, Dh), materialise the block-diagonal bias on the CPU
        seen.append(type(attn_bias).__name__)
        T, H = q.shape[1], q.shape[2]
        bias = attn_bias.materialize((1, H, T, T), dtype=q.dtype, device=q.device)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
        return out.transpose(1, 2)

    x, text = _tiny_inputs()
    want = _train_forward(df.apply(create_tiny_clip(seed=0), df.IWTDConfig(mode="drop", backend="reference")), x, text)
    monkeypatch.setattr(xops, "memory_efficient_attention", emulated)
    monkeypatch.setattr(attention, "packed_kernel", lambda kernel, device, dtype: "xformers")
    got = _train_forward(df.apply(create_tiny_clip(seed=0), df.IWTDConfig(mode="drop", backend="reference")), x, text)
    assert {"BlockDiagonalMask", "BlockDiagonalCausalMask"} <= set(seen), seen
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_xformers_refused_on_cpu_with_the_reason():
    model = create_tiny_clip(seed=0)
    with pytest.raises(ValueError, match="xformers") as info:
        df.apply(model, df.IWTDConfig(attention="xformers"))
    reason = "CUDA-only" if HAS_XFORMERS else "not installed"
    assert reason in str(info.value)
    with pytest.raises(ValueError, match="attention='xformers' cannot run here"):
        attention.attend(*(torch.zeros(1, 1, 2, 4),) * 3, None, kernel="xformers")


def _anchor_case(causal: bool, use_rows: bool):
    block = create_tiny_clip(seed=0).transformer.resblocks[0]
    x, valid, rows, lengths = _padded_batch()
    # text: the anchor is each sample's last valid token (EOS); elsewhere any valid token (CLS at 0)
    anchor = torch.tensor(lengths) - 1 if causal else torch.tensor([0, 2, 1])
    layout = Layout(valid=valid, causal=causal, lengths=lengths, rows=rows if use_rows else None)
    return block, x.requires_grad_(True), anchor, layout


@pytest.mark.parametrize("use_rows", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_anchor_block_matches_the_full_block_at_the_anchors(causal, use_rows):
    block, x, anchor, layout = _anchor_case(causal, use_rows)
    got = attention.anchor_block_forward(block, x, anchor, layout)
    full = block_forward(block, x, Layout(valid=layout.valid, causal=causal, lengths=layout.lengths))
    want = full[torch.arange(x.shape[0]), anchor]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(got)
    params = [x, *block.parameters()]
    got_grads = torch.autograd.grad(got, params, g, allow_unused=True)
    want_grads = torch.autograd.grad(want, params, g, allow_unused=True)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_XFORMERS, reason="xformers is not installed")
def test_anchor_block_on_the_xformers_dense_bias(monkeypatch):
    # one query per sample against S keys: the dense bias is (B, H, 1, S), padded to a multiple of 8 keys
    import xformers.ops as xops

    def emulated(q, k, v, attn_bias=None, **_):  # (B, S, H, Dh) with a dense (B, H, Sq, Sk) bias view
        assert attn_bias.shape == (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn_bias)
        return out.transpose(1, 2)

    monkeypatch.setattr(xops, "memory_efficient_attention", emulated)
    monkeypatch.setattr(attention, "xformers_unavailable", lambda device: None)
    block, x, anchor, layout = _anchor_case(causal=True, use_rows=True)
    got = attention.anchor_block_forward(block, x, anchor, layout, kernel="xformers")
    want = attention.anchor_block_forward(block, x, anchor, layout)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
