"""IWTD inside open_clip against the independent per-sample reference (tests/patch_reference.py).

"perturb", "drop" and "drop_fixed" on both towers with and without deep
prompts, gradients (prompts, bridge, unfrozen weights; none to dropped
positions), drop statistics, prompt bookkeeping after compaction.
"""
from __future__ import annotations

import copy
import math
import os
import sys

import pytest
import torch

import drople_fast as df
from drople_fast.clip import patch
from drople_fast.training.tiny_clip import create_tiny_clip
from drople_fast.clip.patch import get_state

sys.path.insert(0, os.path.dirname(__file__))
import patch_reference as R  # noqa: E402

TOL = 1e-4  # per-sample original blocks vs padded SDPA blocks: fp32, relative to the largest value
PROB_TOL = 1e-5


def rel_err(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


class Recorder:
    """Records, per IWTD step of the patched model, the token layout going in and the IWTD output
    (through the public step observer)."""

    def __init__(self, model, inject: bool = False):
        self.calls = []

        def observe(record):
            tokens = record.tokens
            call = _Call(tower=record.tower, layer=record.layer, width=tokens.length, valid=tokens.valid.clone(),
                         prompt=tokens.prompt.clone(), replace_next=record.replace_next, record=record)
            if inject:  # a zero we can take the gradient of, at this layer's output positions
                call["z"] = torch.zeros_like(tokens.x, requires_grad=True)
                tokens.x = tokens.x + call["z"]
            self.calls.append(call)

        patch.set_step_observer(model, observe)

    def tower(self, name):
        return [c for c in self.calls if c["tower"] == name]

    def clear(self):
        self.calls.clear()


class _Call(dict):
    """One recorded step; ``call["out"]`` is the step's IWTDOutput once the operator has run."""

    def __missing__(self, key):
        if key == "out" and self["record"].out is not None:
            return self["record"].out
        raise KeyError(key)


def check_against_log(calls, logs, tol_prob=PROB_TOL):
    """The patched model's per-layer masks/probabilities/features equal the reference's."""
    assert [c["layer"] for c in calls] == sorted(logs)
    for c in calls:
        log, out = logs[c["layer"]], c["out"]
        assert c["width"] == log.width, f"layer {c['layer']}: width {c['width']} != {log.width}"
        for b, (mask, prob, elig) in enumerate(zip(log.drop_mask, log.drop_prob, log.eligible)):
            n = mask.shape[0]
            assert out.valid[b, :n].all() and not out.valid[b, n:].any(), f"layer {c['layer']} sample {b}"
            assert torch.equal(out.eligible[b, :n], elig), f"layer {c['layer']} sample {b}: eligible set"
            assert torch.equal(out.drop_mask[b, :n], mask), f"layer {c['layer']} sample {b}: drop mask"
            assert not out.drop_mask[b, n:].any()
            torch.testing.assert_close(out.drop_prob[b, :n], prob, rtol=0, atol=tol_prob)
        assert rel_err(out.bridge_features, log.features) <= TOL, f"layer {c['layer']}: bridge features"


def setup(mode, custom_text=False, hook_kwargs=None, seed=0, **cfg):
    model = create_tiny_clip(seed=seed, **({"custom_text": True} if custom_text else {}))
    orig = copy.deepcopy(model)
    config = df.IWTDConfig(mode=mode, **cfg)
    df.apply(model, config)
    hook = None
    if hook_kwargs is not None:
        hook = R.Prompts(64, 64, **hook_kwargs)
        df.set_prompt_hook(model, hook)
    model.train()
    orig.train()
    return model, orig, get_state(model).config, get_state(model).bridge, hook


def images(B=3, seed=0):
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------
# forward equality with the reference
# --------------------------------------------------------------------------

DEEP = dict(vision_layers=range(7), text_layers=range(9), n_vision=2, n_text=4)


@pytest.mark.parametrize("mode", ["perturb", "drop", "drop_fixed"])
@pytest.mark.parametrize("prompts", [False, True], ids=["no-prompts", "deep-prompts"])
def test_vision_matches_per_sample_reference(mode, prompts):
    model, orig, cfg, bridge, hook = setup(mode, hook_kwargs=DEEP if prompts else None, sigma=0.5)
    rec = Recorder(model)
    counter = R.ReferenceCounter()
    for step in range(2):  # the second forward checks the seed schedule advances like the reference's
        x = images(seed=step)
        rec.clear()
        got = model.encode_image(x)
        want, logs = R.vision_reference(orig, x, cfg, bridge, hook, counter.next("vision", cfg, True))
        assert rel_err(got, want) <= TOL
        check_against_log(rec.tower("vision"), logs)
        feats = df.bridge_features(model)["vision"]
        assert sorted(feats) == list(range(6))
    if mode != "perturb":
        assert sum(int(m.sum()) for log in logs.values() for m in log.drop_mask) > 0, "nothing was dropped"


TEXT_CASES = {
    # name: (mode, model kind, prompt hook, eos_trim)
    "perturb-CLIP-words": ("perturb", False, None, True),
    "perturb-CLIP-prompts-untrimmed": ("perturb", False, DEEP, False),
    "drop-CLIP-words": ("drop", False, None, True),
    "drop-CLIP-words-untrimmed": ("drop", False, None, False),
    "drop-CLIP-prompts": ("drop", False, DEEP, True),
    "drop-Custom-prompts": ("drop", True, DEEP, True),
    "perturb-Custom-words": ("perturb", True, None, True),
    "drop_fixed-CLIP-words": ("drop_fixed", False, None, True),
    "drop_fixed-CLIP-prompts": ("drop_fixed", False, dict(DEEP, text_layers=(0, 1, 2, 3)), True),
}


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_text_matches_per_sample_reference(case):
    mode, custom, hook_kwargs, trim = TEXT_CASES[case]
    model, orig, cfg, bridge, hook = setup(mode, custom_text=custom, hook_kwargs=hook_kwargs, sigma=0.5,
                                           eos_trim=trim)
    n_ctx = 4 if hook_kwargs else 0
    rec = Recorder(model)
    counter = R.ReferenceCounter()
    for step, lengths in enumerate([[3, 11, 1, 6], [8, 2, 20, 5]]):
        text = R.make_text(lengths, n_ctx=n_ctx, seed=step)
        rec.clear()
        got = model.encode_text(text)
        want, logs = R.text_reference(orig, text, cfg, bridge, hook, counter.next("text", cfg, True), eos_trim=trim)
        assert rel_err(got, want) <= TOL
        check_against_log(rec.tower("text"), logs)
    assert sum(int(m.sum()) for log in logs.values() for m in log.drop_mask) > 0


def test_backends_agree_in_the_patch():
    """The default CPU backend (C++ when built) and the reference backend give the same drop path."""
    outs = []
    for backend in ("reference", None):
        model = create_tiny_clip()
        df.apply(model, df.IWTDConfig(mode="drop", backend=backend))
        df.set_prompt_hook(model, R.Prompts(64, 64, **DEEP))
        model.train()
        outs.append((model.encode_image(images()), model.encode_text(R.make_text([3, 9, 1], n_ctx=4))))
    assert rel_err(outs[0][0], outs[1][0]) <= TOL
    assert rel_err(outs[0][1], outs[1][1]) <= TOL


def test_drop_everything_then_more_iwtd_layers():
    """p_min = p_max = 1 drops every eligible token after layer 0, leaving CLS alone; the later IWTD layers
    must cope (nothing left to drop) instead of raising, and the result is CLS run alone through layers 1-11.
    """
    model, orig, cfg, bridge, _ = setup("drop", vision_layers=(0, 1, 2), p_min=1.0, p_max=1.0)
    x = images(B=2)
    want, logs = R.vision_reference(orig, x, cfg, bridge, None, R.forward_seed(0, 1, "vision"))
    assert [m.shape[0] for m in logs[1].drop_mask] == [1, 1]
    got = model.encode_image(x)
    assert rel_err(got, want) <= TOL


# --------------------------------------------------------------------------
# deep prompts survive compaction
# --------------------------------------------------------------------------


def test_deep_prompts_resupplied_after_drop_both_towers():
    """Prompts of different counts per layer; every prompted layer sees exactly its own prompts at 1..n."""
    counts_v, counts_t = [2, 3, 1, 2, 4, 2, 3], [4, 2, 3, 1, 4, 2, 3, 2, 1]
    hook_kwargs = dict(vision_layers=range(7), text_layers=range(9), n_vision=counts_v, n_text=counts_t)
    model, orig, cfg, bridge, hook = setup("drop", hook_kwargs=hook_kwargs, p_min=0.4, p_max=0.9)
    rec = Recorder(model)
    counter = R.ReferenceCounter()
    x = images(B=4)
    got = model.encode_image(x)
    want, logs = R.vision_reference(orig, x, cfg, bridge, hook, counter.next("vision", cfg, True))
    assert rel_err(got, want) <= TOL
    check_against_log(rec.tower("vision"), logs)
    text = R.make_text([3, 11, 1, 6], n_ctx=4)
    got = model.encode_text(text)
    want, logs_t = R.text_reference(orig, text, cfg, bridge, hook, counter.next("text", cfg, True))
    assert rel_err(got, want) <= TOL
    check_against_log(rec.tower("text"), logs_t)
    for tower, counts in (("vision", counts_v), ("text", counts_t)):
        dropped_prompts = 0
        for c in rec.tower(tower):
            n = counts[c["layer"]]
            expect = torch.zeros_like(c["prompt"])
            expect[:, 1:1 + n] = True
            assert torch.equal(c["prompt"], expect), f"{tower} layer {c['layer']}: prompts not at 1..{n}"
            dropped_prompts += int((c["out"].drop_mask & c["prompt"]).sum())
        assert dropped_prompts > 0, f"{tower}: no prompt was ever dropped, the test proves nothing"


# --------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------

UNFROZEN = ("visual.transformer.resblocks.2.attn.in_proj_weight", "visual.transformer.resblocks.9.mlp.c_fc.weight",
            "visual.proj", "transformer.resblocks.1.attn.in_proj_weight", "transformer.resblocks.10.mlp.c_proj.bias")


def _loss(features, bridge_feats, generator):
    loss = (features * torch.randn(features.shape, generator=generator)).sum()
    for layer in sorted(bridge_feats):
        f = bridge_feats[layer]
        loss = loss + (f * torch.randn(f.shape, generator=generator)).sum()
    return loss


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_drop_gradients_match_reference(tower):
    hook_kwargs = dict(vision_layers=range(7), text_layers=range(9), n_vision=2, n_text=4)
    model, orig, cfg, bridge, hook = setup("drop", hook_kwargs=hook_kwargs)
    for m in (model, orig):
        for name, p in m.named_parameters():
            p.requires_grad_(name in UNFROZEN or name.startswith("drople_bridge"))
    counter = R.ReferenceCounter()

    def grads(run):
        for p in list(model.parameters()) + list(orig.parameters()) + list(hook.parameters()):
            p.grad = None
        features, feats = run()
        _loss(features, feats, torch.Generator().manual_seed(1)).backward()
        named = {n: p.grad for n, p in hook.named_parameters()}
        named.update({f"bridge.{n}": p.grad for n, p in bridge.named_parameters()})
        src = model if run is patched else orig
        named.update({n: p.grad for n, p in src.named_parameters() if n in UNFROZEN})
        return named

    if tower == "vision":
        x = images()

        def patched():
            return model.encode_image(x), df.bridge_features(model)["vision"]

        def reference():
            out, logs = R.vision_reference(orig, x, cfg, bridge, hook, counter.next("vision", cfg, True))
            return out, {layer: log.features for layer, log in logs.items()}
    else:
        text = R.make_text([3, 11, 1, 6], n_ctx=4)

        def patched():
            return model.encode_text(text), df.bridge_features(model)["text"]

        def reference():
            out, logs = R.text_reference(orig, text, cfg, bridge, hook, counter.next("text", cfg, True))
            return out, {layer: log.features for layer, log in logs.items()}

    got, want = grads(patched), grads(reference)
    own = (f"{tower}.", f"bridge.{tower}.", "bridge.tokens", "visual." if tower == "vision" else "transformer.")
    assert set(got) == set(want)
    checked = 0
    for name, w in want.items():
        g = got[name]
        if not name.startswith(own):
            assert g is None and w is None, name
            continue
        assert g is not None and w is not None, f"{name}: no gradient"
        assert w.abs().max() > 0, name
        assert rel_err(g, w) <= 1e-3, f"{name}: {rel_err(g, w)}"
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_dropped_positions_get_no_gradient(tower):
    """Gradient w.r.t. an IWTD layer's output: zero exactly at dropped (and replaced-prompt) positions."""
    hook_kwargs = dict(vision_layers=(0, 1, 2), text_layers=(0, 1, 2), n_vision=2, n_text=4)
    model, orig, cfg, bridge, hook = setup("drop", hook_kwargs=hook_kwargs, vision_layers=range(6),
                                           text_layers=range(9))
    rec = Recorder(model, inject=True)
    if tower == "vision":
        out = model.encode_image(images(B=4))
    else:
        out = model.encode_text(R.make_text([3, 11, 1, 6], n_ctx=4))
    out.square().sum().backward()  # features only: the bridge loss would reach every token of the layer
    n_dropped = 0
    for c in rec.tower(tower):
        removed = c["out"].drop_mask | (c["prompt"] if c["replace_next"] else torch.zeros_like(c["prompt"]))
        kept = c["valid"] & ~removed
        norms = c["z"].grad.abs().sum(dim=-1)
        assert (norms[removed] == 0).all(), f"layer {c['layer']}: a dropped position got a gradient"
        assert (norms[~c["valid"]] == 0).all(), f"layer {c['layer']}: padding got a gradient"
        assert (norms[kept] > 0).all(), f"layer {c['layer']}: a kept position got no gradient"
        n_dropped += int(c["out"].drop_mask.sum())
    assert n_dropped > 0


# --------------------------------------------------------------------------
# drop statistics
# --------------------------------------------------------------------------


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_drop_counts_match_drop_prob(tower):
    """Per layer, the number of dropped tokens D over N forwards satisfies |D - sum p| <= 4.5 sqrt(sum p(1-p)).

    (Bernoulli sum, normal approximation; deterministic seeds, so no flakiness.
    Also: exactly the dropped tokens disappear from the next layer.)
    """
    model = create_tiny_clip()
    df.apply(model, df.IWTDConfig(mode="drop", vision_layers=range(6), text_layers=range(9)))
    model.train()
    rec = Recorder(model)
    with torch.no_grad():
        for step in range(6):
            if tower == "vision":
                model.encode_image(images(B=8, seed=step))
            else:
                model.encode_text(R.make_text([20, 11, 30, 6, 15, 25, 9, 40], seed=step))
    calls = rec.tower(tower)
    layers = sorted({c["layer"] for c in calls})
    assert layers == list(range(6 if tower == "vision" else 9))
    for layer in layers:
        drop = expect = var = 0.0
        for c in (c for c in calls if c["layer"] == layer):
            out = c["out"]
            p = out.drop_prob[out.eligible]
            assert ((p >= 0.1 - 1e-6) & (p <= 0.5 + 1e-6)).all()
            assert not (out.drop_mask & ~out.eligible).any()
            drop += float(out.drop_mask.sum())
            expect += float(p.sum())
            var += float((p * (1 - p)).sum())
        assert abs(drop - expect) <= 4.5 * math.sqrt(var), f"layer {layer}: dropped {drop}, expected {expect:.1f}"
    # removal accounting: valid tokens entering layer l+1 = valid after layer l minus the dropped ones
    for a, b in zip(calls, calls[1:]):
        if b["layer"] == a["layer"] + 1:
            before = a["valid"].sum(dim=1) - a["out"].drop_mask.sum(dim=1)
            assert torch.equal(b["valid"].sum(dim=1), before)
            assert b["width"] == int(before.max())


def test_drop_fixed_budget_and_static_shapes():
    hook_kwargs = dict(vision_layers=range(5), text_layers=(), n_vision=2)
    model, *_ = setup("drop_fixed", hook_kwargs=hook_kwargs, vision_layers=(0, 3, 6), keep_ratio=0.5)
    rec = Recorder(model)
    model.encode_image(images(B=4))
    calls = rec.tower("vision")
    # layer 0: CLS + 2 prompts + 16 patches = 19; the replaced prompts go, 8 of 16 patches stay, 2 new prompts
    # layer 3: 1 + 2 + 8 = 11 -> 4 patches stay, 2 new prompts (layer 4's, kept through layers 5-6)
    # layer 6: 1 + 2 + 4 = 7
    assert [c["width"] for c in calls] == [19, 11, 7]
    assert all(bool(c["valid"].all()) for c in calls), "drop_fixed must not pad the vision tower"
