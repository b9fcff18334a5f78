"""Public API contract: argument checks, backend selection, seeds, IWTDConfig."""
from __future__ import annotations


import pytest
import torch

import drople_fast as df
from drople_fast.ops import backends
from drople_fast.ops.backends import BACKENDS, select_backend

B, H, S, Dh, D, M, P = 3, 2, 7, 4, 6, 5, 8


def good(**over):
    g = torch.Generator().manual_seed(0)
    args = dict(
        q=torch.randn(B, H, S, Dh, generator=g), k=torch.randn(B, H, S, Dh, generator=g),
        hidden=torch.randn(B, S, D, generator=g), eligible=torch.ones(B, S, dtype=torch.bool),
        bridge_tokens=torch.randn(M, P, generator=g), bridge_weight=torch.randn(P, D, generator=g),
        bridge_bias=torch.randn(P, generator=g), anchor_index=0, valid=None, causal=False, seed=0,
        backend="reference",
    )
    args.update(over)
    return args


def raises(exc, *fragments, **over):
    """iwtd(**good(**over)) raises ``exc`` whose message contains every fragment (case-insensitive)."""
    with pytest.raises(exc) as info:
        df.iwtd(**good(**over))
    msg = str(info.value)
    for frag in fragments:
        assert frag.lower() in msg.lower(), f"{frag!r} not in {msg!r}"
    return msg


def shape_str(*dims):
    return str(tuple(dims))


def test_good_arguments_run():
    out = df.iwtd(**good())
    assert out.importance.shape == (B, S)
    assert out.bridge_features.shape == (B, M, P)


# --------------------------------------------------------------------------
# ranks and shapes
# --------------------------------------------------------------------------

RANK_CASES = [
    ("q", torch.zeros(B, S, Dh), shape_str(B, S, Dh)),
    ("q", torch.zeros(1, B, H, S, Dh), shape_str(1, B, H, S, Dh)),
    ("k", torch.zeros(B, H * S, Dh), shape_str(B, H * S, Dh)),
    ("hidden", torch.zeros(B, S), shape_str(B, S)),
    ("hidden", torch.zeros(1, B, S, D), shape_str(1, B, S, D)),
    ("bridge_tokens", torch.zeros(M * P), shape_str(M * P)),
    ("bridge_weight", torch.zeros(1, P, D), shape_str(1, P, D)),
    ("bridge_bias", torch.zeros(1, P), shape_str(1, P)),
]


@pytest.mark.parametrize("name,value,seen", RANK_CASES, ids=[f"{c[0]}-{c[2]}" for c in RANK_CASES])
def test_wrong_rank(name, value, seen):
    raises(ValueError, name, seen, **{name: value})


def test_q_k_shape_mismatch():
    raises(ValueError, "q", "k", shape_str(B, H, S, Dh), shape_str(B, H, S, Dh + 1),
           k=torch.zeros(B, H, S, Dh + 1))
    raises(ValueError, "k", shape_str(B, H + 1, S, Dh), k=torch.zeros(B, H + 1, S, Dh))


@pytest.mark.parametrize("hidden_shape", [(B + 1, S, D), (B, S + 2, D), (1, S, D)])
def test_hidden_batch_or_sequence_mismatch(hidden_shape):
    raises(ValueError, "hidden", shape_str(*hidden_shape), shape_str(B, H, S, Dh),
           hidden=torch.zeros(*hidden_shape))


def test_bridge_shape_mismatch():
    raises(ValueError, "bridge_weight", shape_str(P, D + 1), bridge_weight=torch.zeros(P, D + 1))
    raises(ValueError, "bridge_weight", shape_str(P + 1, D), bridge_weight=torch.zeros(P + 1, D))
    raises(ValueError, "bridge_bias", shape_str(P + 1), bridge_bias=torch.zeros(P + 1))


@pytest.mark.parametrize("shape", [(B, S + 1), (B + 1, S), (S + 1,), (1, S), (B, S, 1)])
def test_eligible_wrong_shape(shape):
    raises(ValueError, "eligible", shape_str(*shape), eligible=torch.ones(*shape, dtype=torch.bool))


@pytest.mark.parametrize("shape", [(B, S + 1), (B + 1, S), (S,), (B, S, 1)])
def test_valid_wrong_shape(shape):
    raises(ValueError, "valid", shape_str(*shape), valid=torch.ones(*shape, dtype=torch.bool))


def test_sequence_too_short():
    raises(ValueError, "S=1", shape_str(B, H, 1, Dh),
           q=torch.zeros(B, H, 1, Dh), k=torch.zeros(B, H, 1, Dh), hidden=torch.zeros(B, 1, D),
           eligible=torch.ones(B, 1, dtype=torch.bool))


# --------------------------------------------------------------------------
# dtypes and types
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["q", "k", "hidden", "bridge_tokens", "bridge_weight", "bridge_bias"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int32])
def test_non_floating(name, dtype):
    value = good()[name].to(dtype)
    raises(TypeError, name, str(dtype), **{name: value})


@pytest.mark.parametrize("name", ["eligible", "valid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8])
def test_non_bool_masks(name, dtype):
    raises(TypeError, name, str(dtype), **{name: torch.ones(B, S, dtype=dtype)})


@pytest.mark.parametrize("name", ["q", "k", "hidden", "eligible", "bridge_tokens", "bridge_weight", "bridge_bias",
                                  "valid"])
def test_not_a_tensor(name):
    value = good()[name]
    value = (torch.ones(B, S, dtype=torch.bool) if value is None else value).tolist()
    raises(TypeError, name, "list", **{name: value})


# --------------------------------------------------------------------------
# devices ("meta" stands in for a second device on a CPU-only machine)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["k", "hidden", "eligible", "bridge_tokens", "bridge_weight", "bridge_bias",
                                  "valid"])
def test_tensors_on_different_devices(name):
    value = good()[name]
    if value is None:
        value = torch.ones(B, S, dtype=torch.bool)
    raises(ValueError, "device", f"{name}=meta", "q=cpu", **{name: value.to("meta")})


def test_anchor_tensor_on_other_device():
    raises(ValueError, "device", "anchor_index=meta", anchor_index=torch.zeros(B, dtype=torch.int64, device="meta"))


# --------------------------------------------------------------------------
# scalar arguments
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name,value", [("p_min", -0.1), ("p_min", 1.5), ("p_max", 1.01), ("p_max", -1.0),
                                        ("p_max", float("nan")), ("p_min", "0.1"), ("p_max", None)])
def test_probability_out_of_range(name, value):
    raises(ValueError, name, repr(value), **{name: value})


def test_p_min_above_p_max():
    raises(ValueError, "p_min", "p_max", "0.6", "0.4", p_min=0.6, p_max=0.4)


def test_probability_edges_are_valid():
    for p_min, p_max in ((0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (0.3, 0.3)):
        out = df.iwtd(**good(p_min=p_min, p_max=p_max))
        E = out.eligible
        assert torch.all(out.drop_prob[E] >= p_min - 1e-6) and torch.all(out.drop_prob[E] <= p_max + 1e-6)
    assert not df.iwtd(**good(p_min=0.0, p_max=0.0)).drop_mask.any()
    everything = df.iwtd(**good(p_min=1.0, p_max=1.0))
    assert torch.equal(everything.drop_mask, everything.eligible)


@pytest.mark.parametrize("anchor", [-1, S, S + 10])
def test_anchor_int_out_of_range(anchor):
    raises(ValueError, "anchor_index", str(anchor), f"{S}", anchor_index=anchor)


@pytest.mark.parametrize("values", [[0, 1, S], [-1, 0, 0], [0, 2 * S, 1]])
def test_anchor_tensor_out_of_range(values):
    raises(ValueError, "anchor_index", str(max(values)) if max(values) >= S else str(min(values)),
           anchor_index=torch.tensor(values))


def test_anchor_tensor_wrong_shape_or_dtype():
    raises(ValueError, "anchor_index", shape_str(B + 1), anchor_index=torch.zeros(B + 1, dtype=torch.int64))
    raises(ValueError, "anchor_index", shape_str(B, 1), anchor_index=torch.zeros(B, 1, dtype=torch.int64))
    raises(TypeError, "anchor_index", "float32", anchor_index=torch.zeros(B))
    raises(TypeError, "anchor_index", "bool", anchor_index=True)
    raises(TypeError, "anchor_index", "float", anchor_index=0.0)


def test_anchor_int32_tensor_accepted_and_equals_int():
    a = df.iwtd(**good(anchor_index=torch.tensor([2, 2, 2], dtype=torch.int32)))
    b = df.iwtd(**good(anchor_index=2))
    for f in ("importance", "drop_prob", "drop_mask", "keep_order"):
        assert torch.equal(getattr(a, f), getattr(b, f))


@pytest.mark.parametrize("seed", [0.5, "1", True, None, torch.tensor([1], dtype=torch.int32),
                                  torch.tensor([1, 2]), torch.tensor(1.0)])
def test_bad_seed(seed):
    with pytest.raises(TypeError, match="seed"):
        df.iwtd(**good(seed=seed))


# --------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------


def test_unknown_backend_name():
    raises(ValueError, "backend", "'cuda_fast'", "reference", backend="cuda_fast")


def test_triton_refuses_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = BACKENDS["triton"].why_not(torch.device("cpu"), torch.float32)
    assert reason is not None
    assert ("CUDA" in reason) or ("not installed" in reason)
    msg = raises(ValueError, "triton", "cannot run here", backend="triton")
    assert reason in msg
    # and automatic selection never picks it: it falls back to a CPU backend
    assert BACKENDS["triton"].why_not(torch.device("cuda"), torch.float32) is not None


def test_triton_device_list_follows_interpreter_flag(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "cpu" in backends._triton_devices()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert backends._triton_devices() == ("cuda",)


def test_backend_dtype_refusal_is_reported():
    # the cpp backend refuses float64 (and may not be built): either way it must refuse with a reason
    reason = BACKENDS["cpp"].why_not(torch.device("cpu"), torch.float64)
    assert reason
    with pytest.raises(ValueError, match="cpp"):
        select_backend("cpp", torch.device("cpu"), torch.float64)
    # the reference backend refuses float64 with the list of what it supports
    reason = BACKENDS["reference"].why_not(torch.device("cpu"), torch.float64)
    assert reason and "float64" in reason
    raises(ValueError, "reference", "float64", q=good()["q"].double(), k=good()["k"].double())


def test_cpp_backend_unbuilt_or_working():
    reason = BACKENDS["cpp"].why_not(torch.device("cpu"), torch.float32)
    if reason is not None:
        assert "drople_fast._C" in reason
        raises(ValueError, "cpp", "cannot run here", backend="cpp")
    else:
        out = df.iwtd(**good(backend="cpp"))
        ref = df.iwtd(**good())
        torch.testing.assert_close(out.drop_prob, ref.drop_prob, rtol=1e-5, atol=1e-6)


def test_default_backend_runs_on_cpu():
    cpu = torch.device("cpu")
    if select_backend(None, cpu, torch.float32) is select_backend("reference", cpu, torch.float32):
        pytest.skip("backend=None resolves to the reference here: nothing to compare it with")
    out = df.iwtd(**good(backend=None))
    ref = df.iwtd(**good())
    torch.testing.assert_close(out.importance, ref.importance, rtol=1e-5, atol=1e-6)


def test_describe_lists_every_backend():
    rows = dict(backends.describe())
    for name in BACKENDS:
        assert f"{name} [cpu]" in rows


# --------------------------------------------------------------------------
# valid edge cases, broadcasting, seeds
# --------------------------------------------------------------------------


def test_no_eligible_tokens_is_valid():
    out = df.iwtd(**good(eligible=torch.zeros(B, S, dtype=torch.bool)))
    assert not out.drop_mask.any()
    assert torch.all(out.drop_prob == 0)
    assert torch.equal(out.keep_count, torch.full((B,), S))
    assert torch.equal(out.keep_order, torch.arange(S).expand(B, S))


def test_all_equal_scores_is_valid():
    z = good()
    out = df.iwtd(**good(q=torch.zeros_like(z["q"]), k=torch.zeros_like(z["k"]),
                         hidden=torch.zeros_like(z["hidden"]), bridge_bias=torch.zeros(P)))
    assert torch.isfinite(out.importance).all()
    E = out.eligible
    torch.testing.assert_close(out.drop_prob[E], torch.full_like(out.drop_prob[E], 0.5))


# every tensor an IWTDOutput exposes (bridge_features is computed on access)
OUTPUT_TENSORS = ("importance", "drop_prob", "drop_mask", "keep_count", "keep_order", "valid", "eligible",
                  "keep_index", "bridge_features")


def test_eligible_1d_broadcasts():
    g = torch.Generator().manual_seed(3)
    row = torch.rand(S, generator=g) < 0.6
    a = df.iwtd(**good(eligible=row, seed=11))
    b = df.iwtd(**good(eligible=row.expand(B, S).clone(), seed=11))
    for f in OUTPUT_TENSORS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_int_and_tensor_seed_agree():
    for seed in (0, 7, 2**40 + 1):
        a = df.iwtd(**good(seed=seed))
        for t in (torch.tensor(seed), torch.tensor([seed])):
            b = df.iwtd(**good(seed=t))
            assert torch.equal(a.drop_mask, b.drop_mask)
            assert torch.equal(a.keep_order, b.keep_order)


def test_same_seed_reproducible_and_different_seeds_differ():
    big = dict(q=torch.randn(4, 2, 65, Dh), k=torch.randn(4, 2, 65, Dh), hidden=torch.randn(4, 65, D),
               eligible=torch.ones(4, 65, dtype=torch.bool))
    a = df.iwtd(**good(seed=1, **big))
    b = df.iwtd(**good(seed=1, **big))
    c = df.iwtd(**good(seed=2, **big))
    assert torch.equal(a.drop_mask, b.drop_mask) and torch.equal(a.keep_order, b.keep_order)
    assert not torch.equal(a.drop_mask, c.drop_mask)
    # the scores do not depend on the seed
    assert torch.equal(a.drop_prob, c.drop_prob)


def test_valid_none_equals_all_true():
    a = df.iwtd(**good(seed=3))
    b = df.iwtd(**good(seed=3, valid=torch.ones(B, S, dtype=torch.bool)))
    for f in OUTPUT_TENSORS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_keep_index_width_is_max_keep_count():
    out = df.iwtd(**good(seed=5, p_min=0.5, p_max=0.9))
    idx = out.keep_index
    assert idx.shape == (B, int(out.keep_count.max()))
    for b in range(B):
        n = int(out.keep_count[b])
        assert torch.all(idx[b, n:] == -1)
        assert torch.all(idx[b, :n] >= 0)


def test_compact_fixed_budget_out_of_range():
    out = df.iwtd(**good())
    h = good()["hidden"]
    with pytest.raises(ValueError, match="keep"):
        df.compact_fixed(h, out, keep=S, num_always=1)
    with pytest.raises(ValueError, match="keep"):
        df.compact_fixed(h, out, keep=-2, num_always=1)


# --------------------------------------------------------------------------
# IWTDConfig
# --------------------------------------------------------------------------


def test_config_defaults_are_release_defaults():
    c = df.IWTDConfig()
    assert c.vision_layers == tuple(range(6)) and c.text_layers == tuple(range(9))
    assert (c.p_min, c.p_max, c.sigma, c.bridge_tokens, c.bridge_dim) == (0.1, 0.5, 0.03, 64, 512)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(mode="dropout"), "mode"),
    (dict(mode=None), "mode"),
    (dict(attention="flash3"), "attention"),
    (dict(p_min=-0.1), "p_min"),
    (dict(p_max=2.0), "p_max"),
    (dict(p_min=0.6, p_max=0.5), "p_min"),
    (dict(sigma=-0.01), "sigma"),
    (dict(sigma=float("nan")), "sigma"),
    (dict(sigma=float("inf")), "sigma"),
    (dict(mode="drop_fixed", keep_tokens=0), "keep_tokens"),
    (dict(mode="drop_fixed", keep_tokens=-3), "keep_tokens"),
    (dict(mode="drop_fixed", keep_tokens=2.0), "keep_tokens"),
    (dict(mode="drop_fixed", keep_ratio=1.5), "keep_ratio"),
    (dict(mode="drop_fixed", keep_ratio=0.0), "keep_ratio"),
    (dict(mode="drop_fixed", keep_ratio=True), "keep_ratio"),
    (dict(mode="drop_fixed", keep_ratio=0.5, keep_tokens=3), "not both"),
    (dict(mode="drop", keep_ratio=0.5), "only applies to mode='drop_fixed'"),
    (dict(mode="perturb", keep_tokens=4), "only applies to mode='drop_fixed'"),
    (dict(backend="bogus"), "backend"),
    (dict(bridge_tokens=0), "bridge_tokens"),
    (dict(bridge_tokens=1.5), "bridge_tokens"),
    (dict(bridge_dim=0), "bridge_dim"),
    (dict(vision_layers=[0, 1.5]), "vision_layers"),
    (dict(text_layers=[2, 2]), "duplicate"),
    (dict(seed=2**64), "seed"),
])
def test_config_invalid_values(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        df.IWTDConfig(**kwargs)
    assert fragment in str(info.value)


def test_config_valid_values_and_keep_count():
    c = df.IWTDConfig(mode="drop_fixed", keep_ratio=0.5, vision_layers=[0, 2], text_layers=range(3))
    assert c.vision_layers == (0, 2) and c.text_layers == (0, 1, 2)
    assert c.keep_count(196) == 98
    assert c.keep_count(1) == 1
    assert df.IWTDConfig(mode="drop_fixed").keep_count(196) == 98  # keep_ratio 0.5 when neither is given
    assert df.IWTDConfig(mode="drop_fixed", keep_tokens=10).keep_count(4) == 4
    assert df.IWTDConfig(mode="drop_fixed", keep_tokens=10).keep_count(40) == 10
    # the old overloaded keep: 1 (a count) and 1.0 (everything) meant opposite things
    assert df.IWTDConfig(mode="drop_fixed", keep_tokens=1).keep_count(40) == 1
    assert df.IWTDConfig(mode="drop_fixed", keep_ratio=1.0).keep_count(40) == 40
    for mode in ("off", "perturb", "drop", "drop_fixed"):
        df.IWTDConfig(mode=mode)


def test_row_stride_checked_and_used():
    for bad in (-1, 1, S - 1, 2.5, True):
        raises(ValueError, "row_stride", repr(bad), row_stride=bad)
    # draws come from offsets b * row_stride + j: the mask equals the wider stream's cut
    out = df.iwtd(**good(seed=9, row_stride=S + 4, p_min=0.3, p_max=0.7))
    from drople_fast.ops.philox import token_uniform

    u = token_uniform(9, B, S + 4)[:, :S]
    assert torch.equal(out.drop_mask, out.eligible & (u < out.drop_prob))
    assert torch.equal(df.iwtd(**good(seed=9, row_stride=S)).drop_mask, df.iwtd(**good(seed=9)).drop_mask)


def test_bool_probability_refused():
    raises(ValueError, "p_min", "True", p_min=True)


@pytest.mark.parametrize("seed", [2**63, 2**64, -(2**63) - 1])
def test_seed_outside_int64(seed):
    raises(ValueError, "seed", str(seed), seed=seed)


def test_anchor_on_padding_refused():
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, S - 2:] = False
    raises(ValueError, "anchor_index", "padding", "[1]", valid=valid, anchor_index=torch.full((B,), S - 1))
    raises(ValueError, "anchor_index", "padding", valid=valid, anchor_index=S - 1)
