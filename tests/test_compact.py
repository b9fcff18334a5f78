"""compact / compact_fixed / gather-scatter ops, mask statistics, torch.compile, fuzzing."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import drople_fast as df
from drople_fast.ops import library as ops
from drople_fast.ops.functional import IWTDOutput, fixed_budget_index
from drople_fast.ops.philox import token_uniform
from iwtd_harness import compile_and_compare


def inputs(B=3, H=2, S=11, Dh=4, D=6, M=4, P=5, causal=False, padded=False, eos=False, gen=0, seed=0,
           elig_frac=0.8):
    g = torch.Generator().manual_seed(gen)
    lengths = torch.full((B,), S)
    valid = None
    if padded:
        lengths = torch.randint(2, S + 1, (B,), generator=g)
        lengths[0] = S
        valid = torch.arange(S)[None, :] < lengths[:, None]
    v = valid if valid is not None else torch.ones(B, S, dtype=torch.bool)
    return dict(
        q=torch.randn(B, H, S, Dh, generator=g) * 1.5, k=torch.randn(B, H, S, Dh, generator=g) * 1.5,
        hidden=torch.randn(B, S, D, generator=g), eligible=(torch.rand(B, S, generator=g) < elig_frac) & v,
        bridge_tokens=torch.randn(M, P, generator=g) * 0.5, bridge_weight=torch.randn(P, D, generator=g) * 0.3,
        bridge_bias=torch.randn(P, generator=g) * 0.1, anchor_index=(lengths - 1) if eos else 0, valid=valid,
        causal=causal, seed=seed,
    )


def fake_output(drop_prob: torch.Tensor, eligible: torch.Tensor, valid: torch.Tensor | None = None) -> IWTDOutput:
    """An IWTDOutput with hand-chosen probabilities (only the fields compaction reads matter)."""
    B, S = drop_prob.shape
    valid = torch.ones(B, S, dtype=torch.bool) if valid is None else valid
    z = torch.zeros(B, S)
    return IWTDOutput(z, drop_prob, torch.zeros(B, S, dtype=torch.bool), valid.sum(1),
                      torch.arange(S).expand(B, S).clone(), valid, eligible & valid)


# --------------------------------------------------------------------------
# compact
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [dict(), dict(padded=True), dict(causal=True, padded=True, eos=True)])
def test_compact_gathers_kept_tokens_in_order(mode):
    inp = inputs(B=4, S=13, gen=1, seed=9, **mode)
    out = df.iwtd(**inp, p_min=0.3, p_max=0.8, backend="reference")
    h = inp["hidden"]
    c = df.compact(h, out)
    K = int(out.keep_count.max())
    assert c.tokens.shape == (4, K, h.shape[-1])
    assert c.valid.shape == c.index.shape == (4, K)
    keep = out.valid & ~out.drop_mask
    for b in range(4):
        kept = keep[b].nonzero().flatten()
        n = kept.numel()
        assert n == int(out.keep_count[b])
        assert torch.equal(c.index[b, :n], kept)
        assert torch.all(c.index[b, n:] == -1)
        assert torch.equal(c.tokens[b, :n], h[b, kept])
        assert torch.all(c.tokens[b, n:] == 0)
        assert torch.equal(c.valid[b], torch.arange(K) < n)


def test_compact_backward_zero_at_dropped():
    inp = inputs(B=3, S=15, padded=True, gen=2, seed=4)
    h = inp["hidden"].clone().requires_grad_()
    out = df.iwtd(**{**inp, "hidden": h}, p_min=0.4, p_max=0.9, backend="reference")
    assert out.drop_mask.any()
    c = df.compact(h, out)
    w = torch.randn(c.tokens.shape, generator=torch.Generator().manual_seed(0))
    (c.tokens * w).sum().backward()
    keep = out.valid & ~out.drop_mask
    dropped_or_pad = ~keep
    assert torch.all(h.grad[dropped_or_pad] == 0)
    for b in range(3):
        n = int(out.keep_count[b])
        torch.testing.assert_close(h.grad[b, c.index[b, :n]], w[b, :n])


def _index_case():
    # two samples, S = 6, gather width 4 with -1 padding, no repeats (as compaction produces)
    return torch.tensor([[0, 2, 3, 5], [1, 4, -1, -1]])


def test_gather_tokens_gradcheck():
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    idx = _index_case()
    assert torch.autograd.gradcheck(lambda t: ops.gather_tokens(t, idx), (x,))
    assert torch.autograd.gradgradcheck(lambda t: ops.gather_tokens(t, idx), (x,))
    y = ops.gather_tokens(x, idx)
    assert torch.equal(y[1, 2:], torch.zeros(2, 3, dtype=torch.float64))
    assert torch.equal(y[0], x[0, [0, 2, 3, 5]])


def test_scatter_tokens_gradcheck():
    rows = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    idx = _index_case()
    assert torch.autograd.gradcheck(lambda t: ops.scatter_tokens(t, idx, 6), (rows,))
    assert torch.autograd.gradgradcheck(lambda t: ops.scatter_tokens(t, idx, 6), (rows,))
    out = ops.scatter_tokens(rows, idx, 6)
    assert out.shape == (2, 6, 3)
    assert torch.equal(out[0, [0, 2, 3, 5]], rows[0])
    assert torch.all(out[0, [1, 4]] == 0)
    assert torch.all(out[1, [0, 2, 3, 5]] == 0)
    # scatter is a left inverse of gather on the kept rows
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    back = ops.scatter_tokens(ops.gather_tokens(x, idx), idx, 6)
    kept = torch.zeros(2, 6, dtype=torch.bool).scatter(1, idx.clamp(min=0), idx >= 0)
    assert torch.equal(back[kept], x[kept]) and torch.all(back[~kept] == 0)


# --------------------------------------------------------------------------
# compact_fixed
# --------------------------------------------------------------------------


def test_compact_fixed_exact_budget_in_order():
    inp = inputs(B=4, S=17, gen=3, seed=1)
    out = df.iwtd(**inp, backend="reference")
    always = out.valid & ~out.eligible
    n_always = int(always.sum(1).max())
    # equal number of always-kept tokens per sample so the budget is exact for every sample
    elig = out.eligible.clone()
    for b in range(4):
        extra = n_always - int(always[b].sum())
        for j in elig[b].nonzero().flatten()[:extra]:
            elig[b, j] = False
    inp["eligible"] = elig
    out = df.iwtd(**inp, backend="reference")
    always = out.valid & ~out.eligible
    assert torch.all(always.sum(1) == n_always)
    keep = 5
    c = df.compact_fixed(inp["hidden"], out, keep=keep, num_always=n_always, seed=3)
    assert c.tokens.shape == (4, keep + n_always, inp["hidden"].shape[-1])
    assert torch.all(c.index >= 0) and c.valid.all()
    for b in range(4):
        idx = c.index[b]
        assert torch.all(idx[1:] > idx[:-1]), "original order, no repeats"
        assert int(out.eligible[b, idx].sum()) == keep
        assert set(always[b].nonzero().flatten().tolist()) <= set(idx.tolist())
        assert torch.equal(c.tokens[b], inp["hidden"][b, idx])
    # reproducible from its seed, different for another seed
    again = df.compact_fixed(inp["hidden"], out, keep=keep, num_always=n_always, seed=3)
    assert torch.equal(again.index, c.index)
    others = [df.compact_fixed(inp["hidden"], out, keep=keep, num_always=n_always, seed=s).index for s in range(4, 12)]
    assert any(not torch.equal(o, c.index) for o in others)
    # num_always=None reads the count from the data
    assert torch.equal(df.compact_fixed(inp["hidden"], out, keep=keep, seed=3).index, c.index)
    # tensor seed == int seed
    assert torch.equal(df.compact_fixed(inp["hidden"], out, keep=keep, num_always=n_always,
                                        seed=torch.tensor(3)).index, c.index)


def test_compact_fixed_short_sample_is_padded():
    drop_prob = torch.full((2, 8), 0.3)
    eligible = torch.ones(2, 8, dtype=torch.bool)
    eligible[:, 0] = False
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 4:] = False  # sample 1 has only 3 eligible tokens
    out = fake_output(drop_prob, eligible, valid)
    idx = fixed_budget_index(out, keep=5, num_always=1, seed=0)
    assert idx.shape == (2, 6)
    assert torch.equal(idx[1], torch.tensor([0, 1, 2, 3, -1, -1]))
    assert int((idx[0] >= 0).sum()) == 6


def test_compact_fixed_backward_zero_at_unselected():
    inp = inputs(B=2, S=12, gen=4)
    h = inp["hidden"].clone().requires_grad_()
    out = df.iwtd(**{**inp, "hidden": h}, backend="reference")
    c = df.compact_fixed(h, out, keep=3, seed=1)
    c.tokens.sum().backward()
    chosen = torch.zeros(2, 12, dtype=torch.bool)
    for b in range(2):
        chosen[b, c.index[b][c.index[b] >= 0]] = True
    assert torch.all(h.grad[~chosen] == 0)
    assert torch.all(h.grad[chosen] == 1)


def test_compact_fixed_exact_budget_with_unequal_always_counts():
    drop_prob = torch.full((2, 9), 0.3)
    eligible = torch.ones(2, 9, dtype=torch.bool)
    eligible[0, :4] = False  # sample 0: 4 always-kept tokens, sample 1: 1
    eligible[1, 0] = False
    out = fake_output(drop_prob, eligible)
    idx = fixed_budget_index(out, keep=2, num_always=4, seed=0)
    for b in range(2):
        chosen = idx[b][idx[b] >= 0]
        assert int(out.eligible[b, chosen].sum()) == 2, (b, idx[b])
        assert set(range(4 if b == 0 else 1)) <= set(chosen.tolist())
    assert torch.all(idx[1, 3:] == -1)  # sample 1 is short: 1 always + 2 eligible, then padding
    # a num_always below the real always-kept count would silently drop always-kept tokens: refused
    with pytest.raises(ValueError, match="num_always"):
        fixed_budget_index(out, keep=2, num_always=3, seed=0)


def test_compact_fixed_importance_weighted_frequencies():
    """Over N seeds a low-p token is kept more often than a high-p token.

    Six eligible tokens, keep 3 (+ the anchor). Token 1 has p = 0.1 (keep weight 0.9) and token 6 has
    p = 0.9 (weight 0.1). Under Gumbel-top-k (successive sampling without replacement) token 1's
    inclusion probability is > 0.75 and token 6's < 0.2 (exact values below, by enumerating orders),
    so with N = 2000 the empirical gap has sd < 0.02 and we require it to be within 5 sd of the exact one.
    """
    p = torch.tensor([[0.0, 0.1, 0.3, 0.5, 0.5, 0.7, 0.9]])
    eligible = torch.ones(1, 7, dtype=torch.bool)
    eligible[0, 0] = False
    N = 2000
    out = fake_output(p.expand(N, 7).clone(), eligible.expand(N, 7))
    counts = torch.zeros(7)
    for seed in range(4):  # N rows per call are independent draws (Philox offset b*S+j); 4 seeds -> 4N draws
        idx = fixed_budget_index(out, keep=3, num_always=1, seed=seed)
        counts += torch.zeros(N, 7).scatter_(1, idx, 1.0).sum(0)
    freq = counts / (4 * N)
    assert freq[0] == 1.0
    # exact inclusion probabilities of successive sampling with weights w = 1 - p
    import itertools

    w = (1 - p[0, 1:]).double().tolist()
    incl = [0.0] * 6
    for order in itertools.permutations(range(6), 3):
        prob, rest = 1.0, sum(w)
        for i in order:
            prob *= w[i] / rest
            rest -= w[i]
        for i in order:
            incl[i] += prob
    incl = torch.tensor(incl)
    n = 4 * N
    sd = (incl * (1 - incl) / n).sqrt()
    assert torch.all((freq[1:].double() - incl).abs() < 5 * sd + 1e-12), (freq, incl)
    assert freq[1] > freq[3] > freq[6]
    assert float(freq[1] - freq[6]) > 0.5


def test_compact_fixed_one_of_k_proportional_to_keep_prob():
    """keep = 1: Gumbel-top-1 picks eligible token j with probability (1 - p_j) / Σ_k (1 - p_k) exactly.
    Empirical frequencies over 8000 draws must be within 5 binomial sd."""
    p = torch.tensor([[0.0, 0.2, 0.5, 0.8, 0.0, 0.65]])
    eligible = torch.tensor([[False, True, True, True, False, True]])
    N = 2000
    out = fake_output(p.expand(N, 6).clone(), eligible.expand(N, 6))
    counts = torch.zeros(6)
    for seed in (11, 12, 13, 14):
        idx = fixed_budget_index(out, keep=1, num_always=2, seed=seed)
        assert idx.shape == (N, 3)
        assert torch.all(idx[:, 0] == 0)  # the always-kept tokens 0 and 4 bracket the chosen one in order
        counts += torch.zeros(N, 6).scatter_(1, idx, 1.0).sum(0)
    n = 4 * N
    freq = counts / n
    assert freq[0] == 1.0 and freq[4] == 1.0
    w = (1 - p[0]) * eligible[0]
    expect = w / w.sum()
    for j in (1, 2, 3, 5):
        sd = math.sqrt(float(expect[j] * (1 - expect[j])) / n)
        assert abs(float(freq[j] - expect[j])) < 5 * sd, (j, float(freq[j]), float(expect[j]))
    assert float(freq[[1, 2, 3, 5]].sum()) == pytest.approx(1.0)


def test_compact_fixed_p_one_never_kept_when_alternatives_exist():
    p = torch.tensor([[0.0, 1.0, 0.5, 0.5, 1.0]])
    eligible = torch.tensor([[False, True, True, True, True]])
    out = fake_output(p.expand(64, 5).clone(), eligible.expand(64, 5))
    idx = fixed_budget_index(out, keep=2, num_always=1, seed=0)
    assert torch.all(idx == torch.tensor([0, 2, 3]))


# --------------------------------------------------------------------------
# mask statistics of the reference backend
# --------------------------------------------------------------------------


def test_reference_drop_frequency_matches_probability():
    """Empirical drop frequency of each token over N seeds is within 5 binomial sd of its p."""
    inp = inputs(B=1, H=3, S=19, causal=True, eos=True, gen=5, elig_frac=0.9)
    copies = 4  # identical samples: rows are independent draws at offsets b*S + j
    rep = {k: (v.expand(copies, *v.shape[1:]).clone() if isinstance(v, torch.Tensor) and v.shape[:1] == (1,)
               else v) for k, v in inp.items()}
    rep["anchor_index"] = inp["anchor_index"].expand(copies).clone()
    n_seeds = 400
    drops = torch.zeros(19)
    probs = None
    for seed in range(n_seeds):
        out = df.iwtd(**{**rep, "seed": seed * 7919 + 1}, backend="reference")
        drops += out.drop_mask.sum(0)
        probs = out.drop_prob[0] if probs is None else probs
        assert torch.equal(out.drop_prob, probs.expand(copies, 19))
    n = n_seeds * copies
    freq = drops / n
    E = out.eligible[0]
    assert E.sum() >= 8
    sd = (probs * (1 - probs) / n).sqrt()
    assert torch.all((freq - probs).abs()[E] <= 5 * sd[E] + 1e-9), (freq, probs)
    assert torch.all(freq[~E] == 0)
    # and the overall rate matches the mean probability tightly
    assert abs(float(freq[E].mean() - probs[E].mean())) < 5 * float((sd[E] ** 2).sum().sqrt() / E.sum())


def test_drop_mask_is_uniform_below_p():
    inp = inputs(B=5, S=23, padded=True, gen=6, seed=31337)
    out = df.iwtd(**inp, backend="reference")
    u = token_uniform(31337, 5, 23)
    assert torch.equal(out.drop_mask, out.eligible & (u < out.drop_prob))


# --------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------


def test_compile_fullgraph_iwtd_and_compact_fixed_matches_eager():
    import torch._dynamo

    inp = inputs(B=2, H=2, S=9, gen=7, seed=5)
    inp.pop("valid")
    inp["anchor_index"] = 0

    def step(q, k, hidden, eligible, bridge_tokens, bridge_weight, bridge_bias, seed):
        out = df.iwtd(q, k, hidden, eligible, bridge_tokens, bridge_weight, bridge_bias, 0, seed=seed,
                      backend="reference")
        c = df.compact_fixed(hidden, out, keep=4, num_always=1, seed=seed)
        return out.importance, out.drop_prob, out.drop_mask, out.keep_order, out.bridge_features, c.tokens, c.index

    args = (inp["q"], inp["k"], inp["hidden"], torch.ones(2, 9, dtype=torch.bool), inp["bridge_tokens"],
            inp["bridge_weight"], inp["bridge_bias"], torch.tensor([5]))
    compiled, _ = compile_and_compare(step, args)
    # a second seed re-uses the graph and still matches
    args2 = args[:-1] + (torch.tensor([6]),)
    for g_, w_ in zip(compiled(*args2), step(*args2)):
        if not g_.is_floating_point():
            assert torch.equal(g_, w_)
    explained = torch._dynamo.explain(step)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.slow
def test_compile_inductor_backward_through_compact_fixed():
    """Inductor (the default backend) compiles forward+backward through the gather with no graph break."""
    import torch._dynamo

    inp = inputs(B=2, H=1, S=7, D=4, gen=8)
    h = inp["hidden"].clone().requires_grad_()

    def step(hidden, q, k, bridge_tokens, bridge_weight, bridge_bias):
        out = df.iwtd(q, k, hidden, torch.ones(7, dtype=torch.bool), bridge_tokens, bridge_weight, bridge_bias, 0,
                      seed=3, backend="reference")
        c = df.compact_fixed(hidden, out, keep=3, num_always=1, seed=3)
        return (c.tokens ** 2).sum() + out.bridge_features.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    rest = (inp["q"], inp["k"], inp["bridge_tokens"], inp["bridge_weight"], inp["bridge_bias"])
    loss = compiled(h, *rest)
    (g1,) = torch.autograd.grad(loss, h)
    h2 = inp["hidden"].clone().requires_grad_()
    (g2,) = torch.autograd.grad(step(h2, *rest), h2)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# hypothesis fuzz
# --------------------------------------------------------------------------


@st.composite
def iwtd_case(draw):
    B = draw(st.integers(1, 4))
    H = draw(st.integers(1, 3))
    S = draw(st.integers(2, 24))
    Dh = draw(st.integers(1, 6))
    D = draw(st.integers(1, 9))
    causal = draw(st.booleans())
    padded = draw(st.booleans())
    eos = draw(st.booleans())
    gen = draw(st.integers(0, 2**16))
    seed = draw(st.integers(-(2**63), 2**63 - 1))
    p_min = draw(st.floats(0.0, 1.0))
    p_max = draw(st.floats(p_min, 1.0))
    elig_1d = draw(st.booleans())
    return B, H, S, Dh, D, causal, padded, eos, gen, seed, p_min, p_max, elig_1d


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(iwtd_case())
def test_fuzz_iwtd_compact_invariants(case):
    B, H, S, Dh, D, causal, padded, eos, gen, seed, p_min, p_max, elig_1d = case
    inp = inputs(B=B, H=H, S=S, Dh=Dh, D=D, causal=causal, padded=padded, eos=eos, gen=gen, seed=seed)
    if elig_1d:
        v0 = inp["valid"][0] if inp["valid"] is not None else torch.ones(S, dtype=torch.bool)
        inp["eligible"] = inp["eligible"][0] & v0
    out = df.iwtd(**inp, p_min=p_min, p_max=p_max, backend="reference")
    valid = out.valid
    # shapes / dtypes
    assert out.importance.shape == out.drop_prob.shape == out.drop_mask.shape == (B, S)
    assert torch.isfinite(out.importance).all() and torch.isfinite(out.drop_prob).all()
    # dropped ⊂ eligible ⊂ valid, anchor never eligible
    assert not (out.drop_mask & ~out.eligible).any()
    assert not (out.eligible & ~valid).any()
    anchor = inp["anchor_index"]
    anchor = torch.full((B,), anchor) if isinstance(anchor, int) else anchor
    assert not out.eligible[torch.arange(B), anchor].any()
    # probabilities in range on E, zero elsewhere
    E = out.eligible
    assert torch.all(out.drop_prob[~E] == 0)
    assert torch.all(out.drop_prob[E] >= p_min - 1e-6) and torch.all(out.drop_prob[E] <= p_max + 1e-6)
    # keep_count = valid - dropped
    assert torch.equal(out.keep_count, valid.sum(1) - out.drop_mask.sum(1))
    # keep_order: kept positions ascending, then -1
    for b in range(B):
        n = int(out.keep_count[b])
        kept = out.keep_order[b, :n]
        assert torch.all(kept[1:] > kept[:-1])
        assert torch.all(out.keep_order[b, n:] == -1)
        assert torch.equal(kept, (valid[b] & ~out.drop_mask[b]).nonzero().flatten())
    idx = out.keep_index
    assert idx.shape == (B, int(out.keep_count.max()))
    # compact
    c = df.compact(inp["hidden"], out)
    assert torch.equal(c.valid, c.index >= 0)
    for b in range(B):
        n = int(out.keep_count[b])
        assert torch.equal(c.tokens[b, :n], inp["hidden"][b, out.keep_order[b, :n]])
    # compact_fixed with the per-batch maximum of always-kept tokens
    always = valid & ~E
    n_always = int(always.sum(1).max())
    n_elig = int(E.sum(1).min())
    keep = min(n_elig, max(0, S - n_always) // 2)
    cf = df.compact_fixed(inp["hidden"], out, keep=keep, num_always=n_always, seed=seed)
    assert cf.index.shape == (B, keep + n_always)
    for b in range(B):
        chosen = cf.index[b][cf.index[b] >= 0]
        assert torch.all(chosen[1:] > chosen[:-1])
        assert torch.all(cf.index[b, chosen.numel():] == -1)
        assert valid[b, chosen].all()
        assert set(always[b].nonzero().flatten().tolist()) <= set(chosen.tolist())
        assert int(E[b, chosen].sum()) == keep
        assert torch.equal(cf.tokens[b, : chosen.numel()], inp["hidden"][b, chosen])
