"""open_clip integration: mode "off" equivalence, apply/remove, state_dict, EOS trimming, bad input, ViT-B/16 smoke.

The IWTD modes ("perturb", "drop", prompts, gradients, drop statistics,
"drop_fixed") are in test_patch_modes.py; torch.compile in test_compile.py.
"""
from __future__ import annotations

import copy
import os
import sys

import open_clip
import pytest
import torch
from torch import nn

import drople_fast as df
from drople_fast.training.tiny_clip import create_tiny_clip
from drople_fast.clip.patch import get_state

sys.path.insert(0, os.path.dirname(__file__))
import patch_reference as R  # noqa: E402

REL = 1e-5  # mode "off": fp32 relative error bound (max abs error / max abs value)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def tiny(custom_text: bool = False, seed: int = 0, **over):
    if custom_text:
        over["custom_text"] = True
    return create_tiny_clip(seed=seed, **over)


def inputs(seed: int = 0, B: int = 3):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, 32, 32, generator=g)
    text = R.make_text([2, 9, 5][:B], seed=seed)
    return images, text


@pytest.fixture(scope="module", params=[False, True], ids=["CLIP", "CustomTextCLIP"])
def model_pair(request):
    model = tiny(custom_text=request.param)
    expected = "CustomTextCLIP" if request.param else "CLIP"
    assert type(model).__name__ == expected
    return model, copy.deepcopy(model)


# --------------------------------------------------------------------------
# mode "off"
# --------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_off_equals_unpatched(model_pair, train):
    model, orig = model_pair
    images, text = inputs()
    df.apply(model, df.IWTDConfig(mode="off"))
    try:
        model.train(train)
        orig.train(train)
        with torch.no_grad():
            assert rel_err(model.encode_image(images), orig.encode_image(images)) <= REL
            assert rel_err(model.encode_text(text), orig.encode_text(text)) <= REL
            got, want = model(images, text), orig(images, text)  # the CLIP forward goes through the patch too
            assert rel_err(got[0], want[0]) <= REL and rel_err(got[1], want[1]) <= REL
    finally:
        df.remove(model)


@pytest.mark.parametrize("mode", ["drop", "perturb", "drop_fixed"])
def test_eval_uses_every_token_in_every_mode(model_pair, mode):
    """IWTD acts only in train mode: eval output equals the unpatched model whatever the mode."""
    model, orig = model_pair
    images, text = inputs(1)
    df.apply(model, df.IWTDConfig(mode=mode, vision_layers=range(6), text_layers=range(9)))
    try:
        model.eval()
        orig.eval()
        with torch.no_grad():
            assert rel_err(model.encode_image(images), orig.encode_image(images)) <= REL
            assert rel_err(model.encode_text(text), orig.encode_text(text)) <= REL
        assert all(not v for v in df.bridge_features(model).values())
        assert all(int(c) == 0 for c in get_state(model).counters.values()), "eval must not advance the seeds"
    finally:
        df.remove(model)


def _module_classes(model):
    return {name: type(m) for name, m in model.named_modules()}


def test_remove_restores_model_exactly(model_pair):
    model, orig = model_pair
    classes = _module_classes(model)
    dict_keys = {name: set(m.__dict__) for name, m in model.named_modules()}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    params = {id(p) for p in model.parameters()}
    images, text = inputs(2)

    df.apply(model, df.IWTDConfig(mode="drop"))
    assert df.is_patched(model)
    bridge = model.drople_bridge
    # while patched: same state_dict keys and values, bridge parameters train with the model
    patched_sd = model.state_dict()
    assert list(patched_sd) == list(sd)
    for k, v in sd.items():
        assert torch.equal(patched_sd[k], v), k
    patched_params = {id(p) for p in model.parameters()}
    bridge_params = {id(p) for p in bridge.parameters()}
    assert bridge_params and bridge_params <= patched_params
    assert patched_params - bridge_params == params
    assert type(model.visual) is not classes["visual"]
    model.train()
    model.encode_image(images).sum().backward()  # exercise the patched path before removing
    model.zero_grad(set_to_none=True)

    df.remove(model)
    assert not df.is_patched(model)
    assert _module_classes(model) == classes
    assert {name: set(m.__dict__) for name, m in model.named_modules()} == dict_keys
    assert {id(p) for p in model.parameters()} == params
    assert not hasattr(model, "drople_bridge")
    assert list(model.state_dict()) == list(sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    for train in (True, False):
        model.train(train)
        orig.train(train)
        with torch.no_grad():
            assert torch.equal(model.encode_image(images), orig.encode_image(images))
            assert torch.equal(model.encode_text(text), orig.encode_text(text))
    # and it can be patched again
    df.apply(model, df.IWTDConfig(mode="off"))
    df.remove(model)


def test_unpatched_checkpoint_loads_strictly_into_patched_model():
    model = tiny(seed=0)
    other = tiny(seed=1)
    df.apply(model, df.IWTDConfig(mode="drop"))
    try:
        result = model.load_state_dict(other.state_dict(), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        for k, v in other.state_dict().items():
            assert torch.equal(model.state_dict()[k], v)
    finally:
        df.remove(model)


def test_patch_state_dict_roundtrip():
    model = tiny()
    df.apply(model, df.IWTDConfig(mode="drop", seed=3))
    try:
        model.train()
        model.encode_image(inputs()[0])
        saved = df.patch_state_dict(model)
        assert saved["counters"]["vision"] == 1
        with torch.no_grad():
            for p in model.drople_bridge.parameters():
                p.add_(1.0)
        df.load_patch_state_dict(model, saved)
        for k, v in saved["bridge"].items():
            assert torch.equal(model.drople_bridge.state_dict()[k], v)
    finally:
        df.remove(model)


# --------------------------------------------------------------------------
# EOS trimming
# --------------------------------------------------------------------------


def _text_features(model, text, trim: bool):
    get_state(model).config.eos_trim = trim
    return model.encode_text(text)


@pytest.mark.parametrize("custom_text", [False, True], ids=["CLIP", "CustomTextCLIP"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_eos_trim_exact_mode_off(custom_text, train):
    model = tiny(custom_text=custom_text)
    hook = R.Prompts(64, 64, vision_layers=(), text_layers=range(9), n_text=4)
    df.apply(model, df.IWTDConfig(mode="off"))
    df.set_prompt_hook(model, hook)
    text = R.make_text([1, 12, 4, 30, 7], n_ctx=4)  # mixed lengths: EOS at 6, 17, 9, 35, 12
    model.train(train)
    with torch.no_grad():
        a = _text_features(model, text, True)
        b = _text_features(model, text, False)
    assert rel_err(a, b) <= REL
    df.remove(model)


@pytest.mark.parametrize("mode, prompts", [("drop", False), ("perturb", True), ("drop", True), ("drop_fixed", True),
                                          ("perturb", False)])
def test_eos_trim_exact_in_training_modes(mode, prompts):
    """EOS trimming is on by default, in every mode, and gives the untrimmed tower's output.

    The same seeds must give the same text features with and without the trim: the Philox offsets
    are b * W + j with W the *untrimmed* width (row_stride, docs/design.md §4). With W the trimmed
    width the IWTD layers before the first compaction -- every layer in "perturb" -- would draw
    different masks/noise; without a prompt learner the words are eligible, so that would show.
    """
    model = tiny()
    df.apply(model, df.IWTDConfig(mode=mode, text_layers=range(9), sigma=0.5))
    n_ctx = 0
    if prompts:
        n_ctx = 4
        df.set_prompt_hook(model, R.Prompts(64, 64, vision_layers=(), text_layers=range(9), n_text=n_ctx))
    text = R.make_text([1, 12, 4, 30, 7], n_ctx=n_ctx)
    model.train()
    saved = df.patch_state_dict(model)
    with torch.no_grad():
        a = _text_features(model, text, True)
        df.load_patch_state_dict(model, saved)  # same forward seed
        b = _text_features(model, text, False)
    df.remove(model)
    assert rel_err(a, b) <= 1e-4


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------


def _raises(fragments, fn, *args, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    msg = str(info.value).lower()
    for frag in fragments:
        assert frag.lower() in msg, f"{frag!r} not in {info.value!r}"


def test_resnet_tower_refused():
    model = create_tiny_clip(vision_cfg={"layers": [1, 1, 1, 1], "width": 16, "image_size": 32})
    assert type(model.visual).__name__ == "ModifiedResNet"
    _raises(["ModifiedResNet", "not supported"], df.apply, model, df.IWTDConfig())
    assert not df.is_patched(model)
    assert not hasattr(model, "drople_bridge")


def test_not_a_clip_refused():
    _raises(["visual"], df.apply, nn.Linear(3, 3), df.IWTDConfig())


@pytest.mark.parametrize("over, fragments", [
    (dict(vision_layers=[12]), ["vision_layers", "12", "12-layer"]),
    (dict(vision_layers=[-1]), ["vision_layers", "-1"]),
    (dict(text_layers=[3, 40]), ["text_layers", "40"]),
])
def test_layer_index_out_of_range(over, fragments):
    model = tiny()
    # negative indices are refused by IWTDConfig itself, too-large ones by apply (it knows the depth)
    _raises(fragments, lambda: df.apply(model, df.IWTDConfig(**over)))
    assert not df.is_patched(model)
    assert type(model.visual).__name__ == "VisionTransformer"


def test_apply_twice_refused():
    model = tiny()
    df.apply(model, df.IWTDConfig())
    _raises(["already patched"], df.apply, model, df.IWTDConfig())
    df.remove(model)
    assert not df.is_patched(model)


def test_remove_unpatched_refused():
    model = tiny()
    _raises(["not patched"], df.remove, model)
    df.apply(model, df.IWTDConfig())
    df.remove(model)
    _raises(["not patched"], df.remove, model)


def test_accessors_on_unpatched_refused():
    model = tiny()
    _raises(["not patched"], df.bridge_features, model)
    _raises(["not patched"], df.set_prompt_hook, model, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_xformers_on_cpu_refused_with_reason():
    model = tiny()
    with pytest.raises(ValueError) as info:
        df.apply(model, df.IWTDConfig(attention="xformers"))
    msg = str(info.value)
    assert "xformers" in msg and ("CUDA" in msg or "not installed" in msg), msg
    assert not df.is_patched(model)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(mode="dropout"), "mode"),
    (dict(attention="flash"), "attention"),
    (dict(mode="drop_fixed", keep_tokens=0), "keep_tokens"),
    (dict(p_min=0.6, p_max=0.5), "p_"),
])
def test_bad_config(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        df.IWTDConfig(**kwargs)


# --------------------------------------------------------------------------
# ViT-B/16 smoke test (real size, batch 1)
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_vit_b16_smoke_drop_forward_backward():
    import open_clip

    model = open_clip.create_model("ViT-B-16", pretrained=None)
    for p in model.parameters():
        p.requires_grad_(False)
    hook = R.Prompts(768, 512, vision_layers=range(6), text_layers=range(9), n_vision=4, n_text=4, scale=0.02)
    df.apply(model, df.IWTDConfig(mode="drop", vision_layers=range(6), text_layers=range(9)))
    df.set_prompt_hook(model, hook)
    model.train()
    image = torch.randn(1, 3, 224, 224)
    text = R.make_text([5], n_ctx=4)
    img = model.encode_image(image, normalize=True)
    txt = model.encode_text(text, normalize=True)
    feats = df.bridge_features(model)
    assert sorted(feats["vision"]) == list(range(6)) and sorted(feats["text"]) == list(range(9))
    assert feats["vision"][0].shape == (1, 64, 512)
    loss = -(img * txt).sum() + sum(f.square().mean() for t in feats.values() for f in t.values())
    loss.backward()
    assert img.shape == (1, 512) and torch.isfinite(loss)
    for name, p in list(hook.named_parameters()) + list(model.drople_bridge.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("drople_bridge"))
    df.remove(model)


def test_custom_attention_blocks_match_unpatched():
    """open_clip's newer Attention / CustomResidualAttentionBlock (same weight names) is supported."""
    from open_clip.transformer import CustomResidualAttentionBlock

    model = tiny(vision_cfg={"block_type": "custom"}, text_cfg={"block_type": "custom"})
    assert isinstance(model.visual.transformer.resblocks[0], CustomResidualAttentionBlock)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    text = open_clip.get_tokenizer("ViT-B-16")(["a red circle", "a photo of a blue square"])
    model.eval()
    with torch.no_grad():
        want = model.encode_image(images), model.encode_text(text)
        df.apply(model, df.IWTDConfig(mode="drop"))
        got = model.encode_image(images), model.encode_text(text)
        model.train()
        model.encode_image(images)  # IWTD runs on the custom blocks too
    df.remove(model)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


def test_custom_attention_extras_refused():
    model = tiny(vision_cfg={"qk_norm": True})
    with pytest.raises(ValueError, match="qk_norm"):
        df.apply(model, df.IWTDConfig())
