"""The measured attention dispatch: every candidate computes the same attention (forward and gradients,
against float64), the table's choice is the nearest measured problem's fastest candidate, and the
patched blocks run what the table picks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from drople_fast.clip import attention_dispatch as dispatch
from drople_fast.clip.attention import Layout, block_forward
from drople_fast.training.tiny_clip import create_tiny_clip

KINDS = ["causal", "key_mask", "causal_and_key_mask", "none"]


def _problem(kind, dtype, B=5, H=3, S=9, Dh=16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, Dh, generator=g, dtype=torch.float64) for _ in range(3))
    lengths = torch.tensor([9, 4, 1, 7, 2])
    mask = (torch.arange(S)[None, :] < lengths[:, None])[:, None, None, :] if "key_mask" in kind else None
    return q, k, v, mask, kind.startswith("causal")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(dispatch.IMPLEMENTATIONS))
def test_every_implementation_matches_float64_attention(name, dtype, kind):
    q64, k64, v64, mask, causal = _problem(kind, dtype)
    if causal and mask is not None:  # as attend() hands it over: one combined mask
        mask, causal = mask & torch.ones(9, 9, dtype=torch.bool).tril(), False
    leaves = [t.to(dtype).requires_grad_(True) for t in (q64, k64, v64)]
    ref_leaves = [t.to(dtype).double().requires_grad_(True) for t in (q64, k64, v64)]
    out = dispatch.IMPLEMENTATIONS[name](*leaves, mask, causal)
    want = F.scaled_dot_product_attention(*ref_leaves, attn_mask=mask, is_causal=causal)
    assert out.dtype == dtype
    # rows every implementation defines: a query with at least one key it may attend to
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    (want * upstream).sum().backward()
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.double(), want, **tol)
    for got, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), ref.grad, **tol)


@pytest.mark.parametrize("name", list(dispatch.IMPLEMENTATIONS))
def test_autocast_does_not_change_what_an_implementation_computes(name):
    """The blocks call these under autocast; sdpa_fp32 must still compute in float32 there (autocast
    lists SDPA as a low-precision op and would otherwise recast its inputs to bf16)."""
    q, k, v, mask, causal = _problem("causal", torch.bfloat16)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    plain = dispatch.IMPLEMENTATIONS[name](q, k, v, mask, causal)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = dispatch.IMPLEMENTATIONS[name](q, k, v, mask, causal)
    assert cast.dtype == plain.dtype == torch.bfloat16
    assert torch.equal(cast, plain)


def _entry(dtype, bh, seq, causal, masked, best, **ms):
    return dict(dtype=dtype, batch_heads=bh, seq=seq, causal=causal, masked=masked, ms=ms or {best: 1.0}, best=best)


@pytest.fixture
def table():
    yield dispatch.set_table
    dispatch.set_table(None)


def test_choice_is_the_nearest_measured_problem_of_the_same_kind(table):
    key = dispatch.device_key(torch.device("cpu"))
    table({key: [_entry("bfloat16", 4000, 18, True, False, "explicit"),
                 _entry("bfloat16", 48, 201, False, False, "sdpa"),
                 _entry("float32", 4000, 18, True, False, "math")]})
    q = lambda B, H, S, dt=torch.bfloat16: torch.zeros(B, H, S, 8, dtype=dt)  # noqa: E731
    assert dispatch.choose(q(400, 8, 12), None, True) == "explicit"
    assert dispatch.choose(q(4, 12, 197), None, False) == "sdpa"
    assert dispatch.choose(q(400, 8, 12, torch.float32), None, True) == "math"
    # no entry of this kind (key-masked) or dtype: torch's own choice
    assert dispatch.choose(q(4, 12, 100), torch.ones(4, 1, 1, 100, dtype=torch.bool), False) == "sdpa"
    assert dispatch.choose(q(400, 8, 12, torch.float16), None, True) == "sdpa"
    table({})  # a device with no entries at all
    assert dispatch.choose(q(400, 8, 12), None, True) == "sdpa"


def test_a_malformed_table_is_refused_with_the_reason(table):
    with pytest.raises(ValueError, match="unknown attention implementations"):
        table({"cpu-X": [_entry("float32", 8, 8, True, False, "fast_magic")]})
    with pytest.raises(ValueError, match="lacks"):
        table({"cpu-X": [{"dtype": "float32"}]})


def test_committed_table_entries_are_measurements_whose_best_is_the_fastest():
    devices = dispatch.table()
    for key, entries in devices.items():
        assert entries, key
        for e in entries:
            assert e["best"] == min(e["ms"], key=e["ms"].get), e
            assert "sdpa" in e["ms"] and len(e["ms"]) >= 3, e  # torch's own choice was a candidate


@pytest.mark.parametrize("best", ["explicit", "math", "sdpa_fp32"])
def test_blocks_run_the_implementation_the_table_picks(table, monkeypatch, best):
    key = dispatch.device_key(torch.device("cpu"))
    table({key: [_entry("float32", 1, 1, c, m, best) for c in (True, False) for m in (True, False)]})
    ran = []
    chosen = dispatch.IMPLEMENTATIONS[best]
    monkeypatch.setitem(dispatch.IMPLEMENTATIONS, best, lambda *a: ran.append(best) or chosen(*a))
    block = create_tiny_clip(seed=0).transformer.resblocks[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 64, generator=g)
    valid = torch.arange(7)[None, :] < torch.tensor([7, 4, 2])[:, None]
    for layout in (Layout(causal=True), Layout(valid=valid), Layout(valid=valid, causal=True)):
        got = block_forward(block, x, layout)
        dispatch.set_table({})
        want = block_forward(block, x, layout)  # torch's SDPA
        table({key: [_entry("float32", 1, 1, c, m, best) for c in (True, False) for m in (True, False)]})
        rows = valid if layout.valid is not None else torch.ones_like(valid)
        torch.testing.assert_close(got[rows], want[rows], atol=2e-5, rtol=2e-5)
    assert ran == [best] * 3
