"""The reference backend against an independent transcription of docs/design.md §2.

``transcribe`` below is written from the formulas alone, in float64, with
explicit Python loops over samples, heads and tokens on a materialised
attention map (torch.softmax of q·kᵀ/√d with -inf masks), and with the
*unfolded* bridge ``T (W h + b)ᵀ``. It shares no code with
``drople_fast.ops.reference`` except the Philox uniforms.
"""
from __future__ import annotations

import math

import pytest
import torch

import drople_fast as df
from drople_fast.ops.philox import token_uniform
from drople_fast.ops.primitives import bridge_features, fold_bridge
from drople_fast.ops.reference import (attention_probs, iwtd_from_attention,
                                   iwtd_reference)

EPS = 1e-8


# --------------------------------------------------------------------------
# independent transcription
# --------------------------------------------------------------------------


def transcribe(q, k, hidden, eligible, valid, anchor, T, W, b_, causal, p_min, p_max, seed):
    """docs/design.md §2 steps 1-7 literally. Returns a dict of float64 / bool tensors (B, S)."""
    q, k, hidden, T, W, b_ = (t.detach().double() for t in (q, k, hidden, T, W, b_))
    B, H, S, Dh = q.shape
    if eligible.dim() == 1:
        eligible = eligible[None].expand(B, S)
    if valid is None:
        valid = torch.ones(B, S, dtype=torch.bool)
    if isinstance(anchor, int):
        anchor = [anchor] * B
    else:
        anchor = [int(a) for a in anchor]

    # materialised attention map, -inf on keys a query may not see
    A = torch.zeros(B, H, S, S, dtype=torch.float64)
    for b in range(B):
        mask = torch.zeros(S, S, dtype=torch.float64)
        for j in range(S):
            for kk in range(S):
                if not valid[b, kk] or (causal and kk > j):
                    mask[j, kk] = -math.inf
        for h in range(H):
            logits = q[b, h] @ k[b, h].T / math.sqrt(Dh) + mask
            A[b, h] = torch.softmax(logits, dim=-1)

    importance = torch.zeros(B, S, dtype=torch.float64)
    drop_prob = torch.zeros(B, S, dtype=torch.float64)
    C_all = torch.zeros(B, S, dtype=torch.bool)
    E_all = torch.zeros(B, S, dtype=torch.bool)
    s_parts = torch.zeros(3, B, S, dtype=torch.float64)
    for b in range(B):
        a = anchor[b]
        C = [j for j in range(S) if valid[b, j] and j != a]
        E = [j for j in C if eligible[b, j]]
        for j in C:
            C_all[b, j] = True
        for j in E:
            E_all[b, j] = True
        s1, s2, s3 = {}, {}, {}
        # 1. anchor score
        for j in C:
            s1[j] = sum(float(A[b, h, a, j]) for h in range(H)) / H
        # 2. context score: strongest other content key, masked entries count as 0
        for j in C:
            total = 0.0
            for h in range(H):
                others = [float(A[b, h, j, kk]) for kk in C if kk != j]
                total += max(others) if others else 0.0
            s2[j] = total / H
        # 3. alignment score from the unfolded bridge, softmax over valid tokens
        mapped = hidden[b] @ W.T + b_  # (S, P) = (W h + b)ᵀ
        logits = T @ mapped.T  # (M, S)
        for j in range(S):
            if not valid[b, j]:
                logits[:, j] = -math.inf
        G = torch.softmax(logits, dim=-1)
        for j in C:
            s3[j] = float(G[:, j].max())
        # 4. normalise over C and average
        I = {}
        sums = [sum(s.values()) + EPS for s in (s1, s2, s3)]
        for j in C:
            I[j] = (s1[j] / sums[0] + s2[j] / sums[1] + s3[j] / sums[2]) / 3
            importance[b, j] = I[j]
            s_parts[0, b, j], s_parts[1, b, j], s_parts[2, b, j] = s1[j], s2[j], s3[j]
        # 5. min-max over C, zero range counts as 1
        lo, hi = min(I.values()), max(I.values())
        span = hi - lo if hi - lo > 0 else 1.0
        # 6. drop probability on E
        for j in E:
            drop_prob[b, j] = p_max - (I[j] - lo) / span * (p_max - p_min)
    # 7. Bernoulli on E with the shared Philox uniforms
    u = token_uniform(seed, B, S).double()
    drop_mask = E_all & (u < drop_prob)
    keep = valid & ~drop_mask
    keep_order = torch.full((B, S), -1, dtype=torch.int64)
    for b in range(B):
        kept = [j for j in range(S) if keep[b, j]]
        keep_order[b, : len(kept)] = torch.tensor(kept, dtype=torch.int64)
    return dict(importance=importance, drop_prob=drop_prob, drop_mask=drop_mask, keep_count=keep.sum(1),
                keep_order=keep_order, content=C_all, elig=E_all, uniform=u, parts=s_parts)


# --------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------


def make(B, H, S, *, Dh=5, D=7, M=3, P=6, causal=False, padded=False, anchor="cls", gen=0, seed=0,
         elig_frac=0.8):
    g = torch.Generator().manual_seed(gen)
    valid = None
    lengths = torch.full((B,), S)
    if padded:
        lengths = torch.randint(3 if S >= 3 else 2, S + 1, (B,), generator=g)
        lengths[0] = max(2, S - 2)  # make sure at least one sample is really padded
        valid = torch.arange(S)[None, :] < lengths[:, None]
    v = valid if valid is not None else torch.ones(B, S, dtype=torch.bool)
    anchor_index = (lengths - 1) if anchor == "eos" else 0
    eligible = (torch.rand(B, S, generator=g) < elig_frac) & v
    return dict(
        q=torch.randn(B, H, S, Dh, generator=g) * 1.5, k=torch.randn(B, H, S, Dh, generator=g) * 1.5,
        hidden=torch.randn(B, S, D, generator=g), eligible=eligible,
        bridge_tokens=torch.randn(M, P, generator=g) * 0.5, bridge_weight=torch.randn(P, D, generator=g) * 0.4,
        bridge_bias=torch.randn(P, generator=g) * 0.2, anchor_index=anchor_index, valid=valid,
        causal=causal, seed=seed,
    )


def expected(inp, p_min=0.1, p_max=0.5):
    return transcribe(inp["q"], inp["k"], inp["hidden"], inp["eligible"], inp["valid"], inp["anchor_index"],
                      inp["bridge_tokens"], inp["bridge_weight"], inp["bridge_bias"], inp["causal"],
                      p_min, p_max, inp["seed"])


def reference_direct(inp, p_min=0.1, p_max=0.5):
    """drople_fast.ops.reference.iwtd_reference with the fused-backend calling convention."""
    B, _, S, _ = inp["q"].shape
    valid = inp["valid"] if inp["valid"] is not None else torch.ones(B, S, dtype=torch.bool)
    a = inp["anchor_index"]
    anchor = torch.full((B,), a, dtype=torch.int64) if isinstance(a, int) else a.to(torch.int64)
    folded, shift = fold_bridge(inp["bridge_tokens"], inp["bridge_weight"], inp["bridge_bias"])
    return iwtd_reference(inp["q"], inp["k"], inp["hidden"], inp["eligible"].expand(B, S), valid, anchor,
                          folded, shift, inp["causal"], p_min, p_max, torch.tensor([inp["seed"]]))


def assert_same(got, exp, tol=1e-5):
    importance, drop_prob, drop_mask, keep_count, keep_order = got[:5]
    torch.testing.assert_close(importance.double(), exp["importance"], rtol=0, atol=tol)
    torch.testing.assert_close(drop_prob.double(), exp["drop_prob"], rtol=0, atol=tol)
    # the masks come from the same uniforms; they may only differ where u is within tol of p
    boundary = (exp["uniform"] - exp["drop_prob"]).abs() < tol
    assert torch.equal(drop_mask & ~boundary, exp["drop_mask"] & ~boundary)
    if not boundary.any():
        assert torch.equal(drop_mask, exp["drop_mask"])
        assert torch.equal(keep_count, exp["keep_count"])
        assert torch.equal(keep_order, exp["keep_order"])


SHAPES = [(1, 1, 3), (3, 3, 7), (2, 5, 13), (1, 2, 2)]
MODES = [
    dict(causal=False, padded=False, anchor="cls"),
    dict(causal=False, padded=True, anchor="cls"),
    dict(causal=True, padded=False, anchor="eos"),
    dict(causal=True, padded=True, anchor="eos"),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%dH%dS%d" % s)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_reference_matches_transcription(shape, mode):
    B, H, S = shape
    if S == 2 and mode["padded"]:
        pytest.skip("no room for padding at S=2")
    for gen, seed in ((0, 0), (1, 123456789), (2, 2**40 + 3)):
        inp = make(B, H, S, gen=gen, seed=seed, **mode)
        exp = expected(inp)
        assert_same(reference_direct(inp), exp)
        out = df.iwtd(**inp, backend="reference")
        assert_same(out, exp)
        assert torch.equal(out.eligible, exp["elig"])
        assert out.importance.dtype == torch.float32 and out.drop_prob.dtype == torch.float32
        assert out.drop_mask.dtype == torch.bool
        assert out.keep_count.dtype == torch.int64 and out.keep_order.dtype == torch.int64


@pytest.mark.parametrize("p_min,p_max", [(0.0, 1.0), (0.3, 0.3), (0.2, 0.9)])
def test_reference_matches_transcription_other_probabilities(p_min, p_max):
    inp = make(3, 3, 9, causal=True, padded=True, anchor="eos", gen=5, seed=77)
    exp = expected(inp, p_min, p_max)
    assert_same(df.iwtd(**inp, p_min=p_min, p_max=p_max, backend="reference"), exp)


def test_reference_per_sample_tensor_anchor_in_the_middle():
    inp = make(3, 2, 9, gen=3, seed=5)
    inp["anchor_index"] = torch.tensor([0, 4, 8])
    exp = expected(inp)
    assert_same(df.iwtd(**inp, backend="reference"), exp)


def test_reference_low_precision_inputs_match_on_rounded_inputs():
    inp = make(2, 3, 11, causal=True, padded=True, anchor="eos", gen=9, seed=1)
    for dtype in (torch.bfloat16, torch.float16):
        low = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
               for k, v in inp.items()}
        exp = expected(low)  # transcription on the same rounded values, in float64
        assert_same(df.iwtd(**low, backend="reference"), exp, tol=2e-5)


# --------------------------------------------------------------------------
# specific rules
# --------------------------------------------------------------------------


def test_causal_row_without_other_content_key_scores_zero():
    """q = 0, hidden = 0, bias = 0, causal, anchor = EOS (last token): s1 and s3 are flat over C,
    so I_j = (1/(L-1) + 1/(L-1) + s2_j / Σ s2) / 3 analytically, with s2_0 = 0 (row 0 sees only itself)
    and s2_j = 1/(j+1) for j ≥ 1 (row j is uniform over its j+1 allowed keys)."""
    B, H, S = 1, 2, 6
    inp = make(B, H, S, causal=True, anchor="eos", gen=4)
    inp["q"] = torch.zeros_like(inp["q"])
    inp["hidden"] = torch.zeros_like(inp["hidden"])
    inp["bridge_bias"] = torch.zeros_like(inp["bridge_bias"])
    inp["anchor_index"] = torch.tensor([S - 1])
    inp["eligible"] = torch.ones(B, S, dtype=torch.bool)
    out = df.iwtd(**inp, backend="reference")
    C = S - 1
    s2 = torch.tensor([0.0] + [1.0 / (j + 1) for j in range(1, C)], dtype=torch.float64)
    I = (2.0 / C + s2 / (s2.sum() + EPS)) / 3
    torch.testing.assert_close(out.importance[0, :C].double(), I, rtol=0, atol=1e-6)
    assert float(out.importance[0, S - 1]) == 0.0
    # token 0 has the lowest importance, so it gets p_max; the most important one (j = 1) gets p_min
    assert out.drop_prob[0, 0].item() == pytest.approx(0.5, abs=1e-6)
    assert out.drop_prob[0, 1].item() == pytest.approx(0.1, abs=1e-6)
    # the transcription agrees as well, and its s2 part is 0 on row 0
    exp = expected(inp)
    assert exp["parts"][1, 0, 0] == 0.0
    assert_same(out, exp)


def test_causal_future_keys_do_not_count():
    """A causal row's max is over allowed (past) keys only; making a future key's logit huge changes nothing
    in that row's score."""
    inp = make(1, 1, 7, causal=True, anchor="eos", gen=8)
    base = df.iwtd(**inp, backend="reference")
    attn = attention_probs(inp["q"], inp["k"], torch.ones(1, 7, dtype=torch.bool), True)
    assert torch.all(attn[0, 0].triu(1) == 0)
    # rows j < 6 can't see key 5; boosting key 5 changes only rows >= 5 and the anchor row
    k2 = inp["k"].clone()
    k2[0, 0, 5] = inp["q"][0, 0, 5] * 10
    a2 = attention_probs(inp["q"], k2, torch.ones(1, 7, dtype=torch.bool), True)
    torch.testing.assert_close(a2[0, 0, :5], attn[0, 0, :5])
    exp = expected({**inp, "k": k2})
    assert_same(df.iwtd(**{**inp, "k": k2}, backend="reference"), exp)
    assert not torch.equal(base.importance, df.iwtd(**{**inp, "k": k2}, backend="reference").importance)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_is_excluded_everywhere(causal):
    inp = make(3, 3, 10, causal=causal, padded=True, anchor="eos" if causal else "cls", gen=11, seed=3)
    valid = inp["valid"]
    base = df.iwtd(**inp, backend="reference")
    pad = ~valid
    assert pad.any()
    g = torch.Generator().manual_seed(99)
    changed = dict(inp)
    for name in ("q", "k"):
        noise = torch.randn(inp[name].shape, generator=g) * 50
        changed[name] = torch.where(pad[:, None, :, None], noise, inp[name])
    noise = torch.randn(inp["hidden"].shape, generator=g) * 50
    changed["hidden"] = torch.where(pad[:, :, None], noise, inp["hidden"])
    changed["eligible"] = inp["eligible"] | pad  # padding must never become eligible
    out = df.iwtd(**changed, backend="reference")
    for field in ("importance", "drop_prob", "drop_mask", "keep_count", "keep_order", "eligible"):
        assert torch.equal(getattr(out, field), getattr(base, field)), field
    torch.testing.assert_close(out.bridge_features, base.bridge_features)
    # and padding is never scored, eligible, dropped or kept
    assert torch.all(out.importance[pad] == 0)
    assert torch.all(out.drop_prob[pad] == 0)
    assert not out.drop_mask[pad].any()
    assert not out.eligible[pad].any()
    for b in range(3):
        kept = out.keep_order[b, : int(out.keep_count[b])]
        assert valid[b, kept].all()


def test_anchor_gets_zero_importance_and_probability():
    for anchor_kind, causal in (("cls", False), ("eos", True)):
        inp = make(4, 3, 9, causal=causal, padded=True, anchor=anchor_kind, gen=12)
        inp["eligible"] = torch.ones(4, 9, dtype=torch.bool)  # even if the caller marks it eligible
        for seed in range(5):
            out = df.iwtd(**{**inp, "seed": seed}, backend="reference")
            a = inp["anchor_index"]
            a = torch.full((4,), a) if isinstance(a, int) else a
            rows = torch.arange(4)
            assert torch.all(out.importance[rows, a] == 0)
            assert torch.all(out.drop_prob[rows, a] == 0)
            assert not out.drop_mask[rows, a].any()
            assert not out.eligible[rows, a].any()
            # the anchor is always kept
            for b in range(4):
                assert int(a[b]) in out.keep_order[b, : int(out.keep_count[b])].tolist()


def test_zero_range_gives_p_max_on_eligible():
    # all-equal scores: q = k = 0 (uniform attention), hidden = 0, bias = 0 (uniform G)
    inp = make(2, 3, 7, gen=13)
    for name in ("q", "k", "hidden", "bridge_bias"):
        inp[name] = torch.zeros_like(inp[name])
    out = df.iwtd(**inp, p_min=0.2, p_max=0.7, backend="reference")
    E = out.eligible
    assert E.any()
    torch.testing.assert_close(out.drop_prob[E], torch.full_like(out.drop_prob[E], 0.7))
    assert torch.all(out.drop_prob[~E] == 0)
    assert_same(out, expected(inp, 0.2, 0.7))
    # one content token (S = 2): its range is zero too
    inp2 = make(3, 2, 2, gen=14)
    inp2["eligible"] = torch.ones(3, 2, dtype=torch.bool)
    out2 = df.iwtd(**inp2, p_min=0.1, p_max=0.45, backend="reference")
    torch.testing.assert_close(out2.drop_prob[:, 1], torch.full((3,), 0.45))
    assert torch.all(out2.drop_prob[:, 0] == 0)


def test_eligible_is_subset_of_content():
    for mode in MODES:
        inp = make(4, 2, 11, gen=15, **mode)
        inp["eligible"] = torch.ones(4, 11, dtype=torch.bool)
        out = df.iwtd(**inp, backend="reference")
        exp = expected(inp)
        assert torch.equal(out.eligible, exp["content"])
        assert not (out.eligible & ~exp["content"]).any()
        assert not (out.drop_mask & ~out.eligible).any()
        assert torch.all(out.drop_prob[~out.eligible] == 0)
        p = out.drop_prob[out.eligible]
        assert torch.all((p >= 0.1 - 1e-6) & (p <= 0.5 + 1e-6))
        # min-max: per sample, p_max and p_min are both attained on C when all of C is eligible
        for b in range(4):
            pb = out.drop_prob[b][out.eligible[b]]
            if pb.numel() >= 2:
                assert pb.max().item() == pytest.approx(0.5, abs=1e-6)
                assert pb.min().item() == pytest.approx(0.1, abs=1e-6)


def test_no_eligible_tokens_keeps_everything():
    inp = make(2, 2, 7, padded=True, gen=16)
    inp["eligible"] = torch.zeros(2, 7, dtype=torch.bool)
    out = df.iwtd(**inp, backend="reference")
    assert not out.drop_mask.any()
    assert torch.equal(out.keep_count, inp["valid"].sum(1))
    assert_same(out, expected(inp))


def test_iwtd_from_attention_on_explicit_map():
    """iwtd_from_attention, given the transcription's own softmax map, agrees with the transcription."""
    inp = make(2, 3, 8, causal=True, padded=True, anchor="eos", gen=17, seed=4)
    B, H, S, Dh = inp["q"].shape
    valid = inp["valid"]
    logits = inp["q"] @ inp["k"].transpose(-1, -2) / math.sqrt(Dh)
    allowed = valid[:, None, None, :] & torch.ones(S, S, dtype=torch.bool).tril()
    attn = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)
    folded, shift = fold_bridge(inp["bridge_tokens"], inp["bridge_weight"], inp["bridge_bias"])
    got = iwtd_from_attention(attn, inp["hidden"], inp["eligible"], valid, inp["anchor_index"], folded, shift,
                              0.1, 0.5, torch.tensor([4]))
    assert_same(got, expected(inp))


# --------------------------------------------------------------------------
# bridge features
# --------------------------------------------------------------------------


def explicit_bridge_features(hidden, T, W, b_, valid):
    """F = G (W h + b), G = softmax over valid tokens of T (W h + b)ᵀ; loops over samples."""
    out = []
    for b in range(hidden.shape[0]):
        mapped = hidden[b] @ W.T + b_  # (S, P)
        logits = T @ mapped.T  # (M, S)
        logits = logits.masked_fill(~valid[b][None, :], -math.inf)
        G = torch.softmax(logits, dim=-1)
        out.append(G @ mapped)
    return torch.stack(out)


def test_bridge_features_equal_explicit_formula():
    inp = make(3, 2, 9, padded=True, gen=18)
    d = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}
    exp = explicit_bridge_features(d["hidden"], d["bridge_tokens"], d["bridge_weight"], d["bridge_bias"],
                                   d["valid"])
    got = bridge_features(d["hidden"], d["bridge_tokens"], d["bridge_weight"], d["bridge_bias"], d["valid"])
    torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)
    out = df.iwtd(**inp, backend="reference")
    assert out.bridge_features.shape == (3, inp["bridge_tokens"].shape[0], inp["bridge_tokens"].shape[1])
    torch.testing.assert_close(out.bridge_features.double(), exp, rtol=1e-5, atol=1e-5)


def test_bridge_features_gradients_flow():
    inp = make(2, 2, 7, padded=True, gen=19)
    # float32 q/k pick the backend; bridge and hidden in float64 for an exact gradient comparison
    leaves = {n: inp[n].double().requires_grad_() for n in ("hidden", "bridge_tokens", "bridge_weight",
                                                            "bridge_bias")}
    out = df.iwtd(**{**inp, **leaves}, backend="reference")
    g = torch.Generator().manual_seed(0)
    R = torch.randn(out.bridge_features.shape, generator=g, dtype=torch.float64)
    (out.bridge_features * R).sum().backward()
    ref_leaves = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
    F = explicit_bridge_features(ref_leaves["hidden"], ref_leaves["bridge_tokens"], ref_leaves["bridge_weight"],
                                 ref_leaves["bridge_bias"], inp["valid"])
    (F * R).sum().backward()
    for n in leaves:
        assert leaves[n].grad is not None, n
        assert torch.isfinite(leaves[n].grad).all(), n
        assert leaves[n].grad.abs().sum() > 0, n
        torch.testing.assert_close(leaves[n].grad, ref_leaves[n].grad, rtol=1e-9, atol=1e-10)
    # padded hidden rows receive exactly zero gradient
    assert torch.all(leaves["hidden"].grad[~inp["valid"]] == 0)


def _bridge_gradcheck_args():
    g = torch.Generator().manual_seed(20)
    B, S, D, M, P = 2, 5, 4, 3, 3
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    args = [torch.randn(B, S, D, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(M, P, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(P, D, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(P, generator=g, dtype=torch.float64, requires_grad=True)]
    return args, valid


def test_bridge_features_gradcheck_float32_level():
    args, valid = _bridge_gradcheck_args()
    assert torch.autograd.gradcheck(lambda h, T, W, b: bridge_features(h, T, W, b, valid), args,
                                    eps=1e-3, atol=2e-3, rtol=1e-2)


def test_bridge_features_gradcheck_float64_strict():
    args, valid = _bridge_gradcheck_args()
    assert torch.autograd.gradcheck(lambda h, T, W, b: bridge_features(h, T, W, b, valid), args)


def test_scores_carry_no_gradient_and_inputs_untouched():
    inp = make(2, 2, 7, gen=21)
    q = inp["q"].clone().requires_grad_()
    before = {k: v.clone() for k, v in inp.items() if isinstance(v, torch.Tensor)}
    out = df.iwtd(**{**inp, "q": q}, backend="reference")
    assert not out.importance.requires_grad and not out.drop_prob.requires_grad
    for k, v in before.items():
        assert torch.equal(inp[k], v), k
