"""torch.compile of patched training steps (tiny 2-layer models, IWTD after both; compile time dominates, so few tests).

* "drop_fixed", image tower: forward + loss + backward in ONE graph
  (``fullgraph=True``; backward traced with ``torch._dynamo.config.trace_autograd_ops``),
  matches eager, and a second step does not recompile.
* "drop_fixed", text tower: compiles (not fullgraph: the EOS trim is skipped while
  compiling) and matches the eager untrimmed tower.
* "drop": compiles (data-dependent widths: graph breaks allowed) and matches eager.

The compile backend is "aot_eager" (Dynamo + AOTAutograd, fake tensors, the custom
ops' fake and autograd registrations) -- what decides graph breaks -- rather than
inductor, whose C++ codegen would take minutes on a 2-core CPU.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch._dynamo.testing

import drople_fast as df
from drople_fast.training.tiny_clip import create_tiny_clip

sys.path.insert(0, os.path.dirname(__file__))
import patch_reference as R  # noqa: E402

BACKEND = "aot_eager"
HAS_TRACE_AUTOGRAD = hasattr(torch._dynamo.config, "trace_autograd_ops")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make(mode, tower="vision", **cfg):
    model = create_tiny_clip(vision_cfg={"layers": 2}, text_cfg={"layers": 2})
    for p in model.parameters():
        p.requires_grad_(False)
    model.visual.proj.requires_grad_(True)  # one unfrozen weight
    cfg = {"vision_layers": (), "text_layers": (), **cfg}
    df.apply(model, df.IWTDConfig(mode=mode, backend="reference", **cfg))
    hook = R.Prompts(64, 64, vision_layers=(0, 1), text_layers=(0, 1), n_vision=2, n_text=4)
    df.set_prompt_hook(model, hook)
    model.train()
    bridge = model.drople_bridge
    if tower == "vision":
        trainable = [*hook.vision.parameters(), bridge.tokens, *bridge.vision.parameters(), model.visual.proj]
    else:
        trainable = [*hook.text.parameters(), bridge.tokens, *bridge.text.parameters()]
    return model, trainable


def image_step(model):
    def step(images):
        out = model.encode_image(images)
        feats = df.bridge_features(model)  # after the forward: features are computed on this call
        loss = out.square().mean() + sum(f.square().mean() for f in feats["vision"].values())
        feats["vision"].clear()  # the patch state's own dict: nothing with a grad_fn may leak out of the graph
        loss.backward()
        return loss.detach()

    return step


def run(step, arg, model, trainable, saved):
    """One step from the saved patch state (same seeds); returns the loss and the gradients."""
    df.load_patch_state_dict(model, saved)
    for p in trainable:
        p.grad = None
    loss = step(arg)
    return loss, [p.grad.clone() for p in trainable]


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_TRACE_AUTOGRAD, reason="this torch cannot trace .backward() inside a graph")
@pytest.mark.slow
def test_drop_fixed_image_training_step_fullgraph():
    model, trainable = make("drop_fixed", vision_layers=(0, 1), keep_ratio=0.5)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    saved = df.patch_state_dict(model)
    eager = run(image_step(model), images, model, trainable, saved)
    counter = torch._dynamo.testing.CompileCounterWithBackend(BACKEND)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(image_step(model), fullgraph=True, backend=counter)
        first = run(compiled, images, model, trainable, saved)
        assert_same(first, eager)
        # the next step (seed advanced, new images) reuses the graph
        saved2 = df.patch_state_dict(model)
        eager2 = run(image_step(model), images * 0.5, model, trainable, saved2)
        second = run(compiled, images * 0.5, model, trainable, saved2)
    assert_same(second, eager2)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
    assert all(g.abs().sum() > 0 for g in first[1])


@pytest.mark.skipif(HAS_TRACE_AUTOGRAD, reason="covered by the one-graph step test above")
def test_drop_fixed_image_forward_fullgraph_backward_outside():
    """The portable form (any torch): forward + loss as one graph, AOTAutograd's backward graph after it."""
    model, trainable = make("drop_fixed", vision_layers=(0, 1), keep_ratio=0.5)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    def forward(x):
        out = model.encode_image(x)
        feats = df.bridge_features(model)  # after the forward: features are computed on this call
        return out.square().mean() + sum(f.square().mean() for f in feats["vision"].values())

    def step(fn):
        def inner(x):
            loss = fn(x)
            loss.backward()
            return loss.detach()
        return inner

    saved = df.patch_state_dict(model)
    eager = run(step(forward), images, model, trainable, saved)
    compiled = run(step(torch.compile(forward, fullgraph=True, backend=BACKEND)), images, model, trainable, saved)
    assert_same(compiled, eager)


@pytest.mark.slow
def test_drop_fixed_text_step_compiles():
    model, trainable = make("drop_fixed", "text", text_layers=(0, 1), keep_ratio=0.5)
    text = R.make_text([3, 9, 1], n_ctx=4)
    def step(t):
        out = model.encode_text(t)
        feats = df.bridge_features(model)
        loss = out.square().mean() + sum(f.square().mean() for f in feats["text"].values())
        loss.backward()
        return loss.detach()

    saved = df.patch_state_dict(model)
    compiled = run(torch.compile(step, backend=BACKEND), text, model, trainable, saved)
    # while compiling the tower runs untrimmed (77 positions), so compare with the untrimmed eager tower
    df.clip.patch.get_state(model).config.eos_trim = False
    eager = run(step, text, model, trainable, saved)
    assert_same(compiled, eager)


@pytest.mark.slow
def test_drop_compiles_and_matches_eager():
    """Data-dependent widths: graph breaks at the kept-count syncs are allowed (dynamic=None lets Dynamo
    mark sizes dynamic on recompiles; dynamic=True compiles the same thing ~3x slower here)."""
    model, trainable = make("drop", vision_layers=(0, 1), p_min=0.2, p_max=0.6)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    saved = df.patch_state_dict(model)
    eager = run(image_step(model), images, model, trainable, saved)
    counter = torch._dynamo.testing.CompileCounterWithBackend(BACKEND)
    compiled_step = torch.compile(image_step(model), dynamic=None, backend=counter)
    compiled = run(compiled_step, images, model, trainable, saved)
    assert_same(compiled, eager)
    assert counter.frame_count >= 1
