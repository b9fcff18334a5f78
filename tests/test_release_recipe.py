"""The DroPLe release's recipe is the default: every item pinned to the release file:line it mirrors.

The release (MIT, /work/shared/release, cited as release/<file>:<line>) is never imported: where a test
needs its behaviour, the few lines concerned are transcribed here, with the citation.
"""
from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import drople_fast
from drople_fast.clip.bridge import BridgeModule
from drople_fast.training.learner import DroPLe, LOGIT_SCALE_MAX
from drople_fast.training.tiny_clip import create_tiny_clip

CLASSES = ["red circle", "blue square", "green cross"]


def make(mode="off", lora_rank=0, seed=1, **kw):
    clip = create_tiny_clip(seed=0)
    torch.manual_seed(seed)
    return DroPLe(clip, CLASSES, iwtd=drople_fast.IWTDConfig(mode=mode), lora_rank=lora_rank, **kw)


def images(B=4, seed=0):
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def kaiming_bound(fan_in: int) -> float:
    # nn.init.kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in)
    return math.sqrt(2.0 / 6.0) * math.sqrt(3.0 / fan_in)


def assert_uniform(t: torch.Tensor, bound: float):
    """t looks like U(-bound, bound): inside the bound, reaching near it, std bound/sqrt(3) within 10 %."""
    t = t.detach().float().flatten()
    assert t.abs().max() <= bound * (1 + 1e-6)
    assert t.abs().max() > 0.9 * bound
    assert abs(float(t.std()) / (bound / math.sqrt(3)) - 1) < 0.1, (float(t.std()), bound / math.sqrt(3))


# --------------------------------------------------------------------------
# item 2: the class prompt has no trailing period
# --------------------------------------------------------------------------


def test_class_prompt_is_release_text_without_period():
    # release/models/drople.py:140-142 tokenises "a photo of a {}".format(c.replace("_", " "))
    # and release/models/drople.py:630-636 puts the learnt context in place of "a photo of a".
    learner = make()
    learner.set_classnames(["red_circle", "blue square"])
    release_ids = open_clip.tokenize(["a photo of a {}".format(c.replace("_", " ")) for c in ["red_circle", "blue square"]])
    ours = learner.prompt_ids
    x_id = int(open_clip.tokenize(["X"])[0, 1])
    assert (ours[:, 1:5] == x_id).all()
    # everything but the four context positions is the release's token sequence (no "." before EOS)
    assert torch.equal(ours[:, 0], release_ids[:, 0]) and torch.equal(ours[:, 5:], release_ids[:, 5:])
    period = int(open_clip.tokenize(["."])[0, 1])
    assert not (ours == period).any()


# --------------------------------------------------------------------------
# item 3: layer-0 visual prompts go through ln_pre
# --------------------------------------------------------------------------


def release_prompted_image_features(clip, prompts, x):
    """release/models/drople.py:749-821 in eval mode, on open_clip's (unpatched) blocks: embeddings,
    prompts appended at the END, pre-LayerNorm over the whole sequence (:753-757), deeper layers
    replace the last n tokens (:760-766), CLS pooled through post-LayerNorm and projected (:814-818)."""
    v = clip.visual
    h = v.conv1(x).flatten(2).transpose(1, 2)
    cls = v.class_embedding.to(h.dtype).expand(h.shape[0], 1, -1)
    h = torch.cat([cls, h], dim=1) + v.positional_embedding.to(h.dtype)
    n = prompts[0].shape[0]
    h = torch.cat([h, prompts[0].unsqueeze(0).expand(h.shape[0], -1, -1)], dim=1)
    h = v.ln_pre(h)
    for idx, block in enumerate(v.transformer.resblocks):
        if 0 < idx < len(prompts):
            h = torch.cat([h[:, :-n], prompts[idx].unsqueeze(0).expand(h.shape[0], -1, -1)], dim=1)
        h = block(h)
    return v.ln_post(h[:, 0]) @ v.proj


def test_layer0_visual_prompts_through_ln_pre_match_release():
    learner = make()
    learner.eval()
    plain = create_tiny_clip(seed=0).eval()
    x = images()
    with torch.no_grad():
        want = release_prompted_image_features(plain, [p for p in learner.vision_ctx], x)
        got = learner.clip.encode_image(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the old layout (prompts inserted after ln_pre) is measurably different, so the test can fail
    with torch.no_grad():
        v = plain.visual
        h = v._embeds(x)
        h = torch.cat([h[:, :1], learner.vision_ctx[0].unsqueeze(0).expand(len(x), -1, -1), h[:, 1:]], dim=1)
        n = learner.n_vis
        for idx, block in enumerate(v.transformer.resblocks):
            if 0 < idx < len(learner.vision_ctx):
                h = torch.cat([h[:, :1], learner.vision_ctx[idx].unsqueeze(0).expand(len(x), -1, -1),
                               h[:, 1 + n:]], dim=1)
            h = block(h)
        old = v.ln_post(h[:, 0]) @ v.proj
    assert not torch.allclose(old, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# item 4: initialisation
# --------------------------------------------------------------------------


def test_deep_prompt_and_bridge_initialisation_match_release_distributions():
    learner = make()
    D_v = learner.clip.visual.transformer.width
    D_t = learner.clip.token_embedding.weight.shape[1]
    # release/models/drople.py:225-228: one (depth, n_vis, D) tensor, kaiming_uniform_(a=sqrt(5)),
    # whose fan_in is n_vis * D
    assert_uniform(torch.stack(list(learner.vision_ctx)), kaiming_bound(learner.n_vis * D_v))
    # release/models/drople.py:239-243: each deep text context (n_ctx, 512), fan_in = width
    assert_uniform(torch.stack(list(learner.text_ctx[1:])), kaiming_bound(D_t))
    # release/models/drople.py:231-236: layer 0 from the embeddings of "a photo of a"
    ids = open_clip.tokenize(["a photo of a"])
    torch.testing.assert_close(learner.text_ctx[0], learner.clip.token_embedding(ids)[0, 1:5])


def test_bridge_initialisation_matches_release():
    torch.manual_seed(0)
    bridge = BridgeModule(768, 512, 64, 512)
    # release/utils/multimodal_alignment.py:16-17: tokens (64, 512) kaiming_uniform_(a=sqrt(5)): std 0.0255
    assert_uniform(bridge.tokens, kaiming_bound(512))
    assert abs(float(bridge.tokens.detach().std()) - 0.0255) < 0.001
    # release/utils/multimodal_alignment.py:20-21: nn.Linear defaults, weight and bias U(±1/sqrt(in))
    assert_uniform(bridge.vision.weight, kaiming_bound(768))
    assert_uniform(bridge.text.weight, kaiming_bound(512))
    assert bridge.vision.bias.abs().max() <= 1 / math.sqrt(768) and bridge.text.bias.abs().max() <= 1 / math.sqrt(512)


def test_vit_b16_prompt_stds_are_the_releases():
    # The expected figures for ViT-B/16 widths (visual 768 x 4 tokens, text 512): std 0.0104 and 0.0255.
    assert abs(kaiming_bound(4 * 768) / math.sqrt(3) - 0.0104) < 1e-4
    assert abs(kaiming_bound(512) / math.sqrt(3) - 0.0255) < 1e-4


# --------------------------------------------------------------------------
# item 5: trainable logit scale, clamped at use
# --------------------------------------------------------------------------


def test_logit_scale_trainable_initialised_and_clamped_like_release():
    learner = make("drop")
    # release/models/drople.py:410: nn.Parameter(log(1 / 0.01)), requires_grad=True
    assert learner.logit_scale.requires_grad
    assert float(learner.logit_scale.detach()) == pytest.approx(math.log(100.0), abs=1e-6)
    # release/models/drople.py:828: clamp(.data, 0, 4.605) before use; the scale is exp of that
    learner.train()
    x, y = images(), torch.tensor([0, 1, 2, 0])
    logits, terms = learner(x, y, epoch=0, total_epochs=2)
    assert float(learner.logit_scale.detach()) == pytest.approx(LOGIT_SCALE_MAX) and LOGIT_SCALE_MAX == 4.605
    with torch.no_grad():
        learner.logit_scale.fill_(7.0)
        learner.logit_scale.grad = None
    logits, terms = learner(x, y, epoch=0, total_epochs=2)
    assert float(learner.logit_scale.detach()) == pytest.approx(4.605)
    learner.eval()
    with torch.no_grad():
        cos = learner.image_features(x) @ learner.text_features().t()
        torch.testing.assert_close(learner(x), math.exp(4.605) * cos, rtol=1e-5, atol=1e-5)
    # the clamp acts on the data, so the parameter still gets a gradient at the bound (as the release's)
    learner.train()
    _, terms = learner(x, y, epoch=0, total_epochs=2)
    terms["total"].backward()
    assert learner.logit_scale.grad is not None and float(learner.logit_scale.grad.abs()) > 0
