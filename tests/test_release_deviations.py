"""Where drople_fast deliberately differs from the DroPLe release, each shown both ways.

For every kept deviation the release's rule is transcribed here (a few lines, citing
release/<file>:<line>; the release is never imported) and run next to drople_fast's real code path:
(a) what the release computes, (b) what drople_fast computes, (c) the property that motivates ours.

* SOS as a perturbation target: the release's text targets are positions [0, 1 + n_ctx)
  (release/models/drople.py:694-699), SOS included; ours are the context tokens only.
* Padding as content: the release scores every position but the last one and pools the bridge over
  all positions (release/utils/token_importance.py:22-27, release/utils/multimodal_alignment.py:66-86),
  padding included, so a class's drop probabilities and bridge features depend on how long the
  *other* class names in the batch are; ours exclude padding.
* Entropy epsilon: the release's entropy is ``-sum p log(p + 1e-5)``
  (release/utils/residual_entropy_loss.py:5-16); ours is exact. The difference is bounded.

(The LoRA-in-the-teacher deviation has its own test with the LoRA defaults; the LLM text tokens of the
release are out of scope.)
"""
from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import drople_fast
from drople_fast.clip.patch import get_state, set_step_observer
from drople_fast.training.learner import DroPLe
from drople_fast.training.losses import LossWeights, residual_entropy, residual_lambda
from drople_fast.training.tiny_clip import create_tiny_clip

EOS_ID = 49407  # open_clip's and HF CLIP's <|endoftext|>; also HF CLIP's pad token (the release's processor)
A = "red circle"  # the class whose features we follow
SHORT = "cat"  # a shorter name: A is the longest prompt, so A has no padding
LONG = "very long striped purple hexagon with dots"  # a longer name: A gets padding after its EOS
EQUAL = ["red circle", "blue square", "green cross"]  # names of one token length: no padding at all


def make(classes, mode="perturb", sigma=0.03):
    clip = create_tiny_clip(seed=0)
    torch.manual_seed(1)
    return DroPLe(clip, classes, iwtd=drople_fast.IWTDConfig(mode=mode, sigma=sigma), lora_rank=0)


def text_forward(learner):
    """One training text forward of drople_fast's patched tower: (features, {layer: (record tokens, IWTDOutput)})."""
    steps = {}

    def observe(record):
        if record.tower == "text":
            steps[record.layer] = record

    learner.train()
    set_step_observer(learner.clip, observe)
    try:
        feats = learner.clip.encode_text(learner.prompt_ids)
    finally:
        set_step_observer(learner.clip, None)
    return feats, steps


# --------------------------------------------------------------------------
# the release's text-tower IWTD, transcribed (release/utils/token_importance.py,
# release/utils/multimodal_alignment.py, release/models/drople.py)
# --------------------------------------------------------------------------


@torch.no_grad()
def release_text_iwtd(attn, hidden, bridge, n_ctx, p_min, p_max):
    """The release's per-layer text IWTD on one layer's (B, H, S, S) attention and (B, S, D) output.

    Returns (importance (B, S-1), drop probability (B, S) on the targets, bridge features (B, M, P)).
    The anchor is the last position: the release appends the EOS there (release/models/drople.py:635).
    """
    B, H, S, _ = attn.shape
    # token_importance.py:23-27: content = every position but the EOS (the last), padding included
    content = torch.ones(S, dtype=torch.bool)
    content[-1] = False
    # token_importance.py:86-89: the EOS row's attention to the others, mean over heads
    cls_attn = attn[:, :, -1, :-1].mean(dim=1)
    # token_importance.py:30-45: strongest other content key per content row, mean over heads, normalised
    diag = ~torch.eye(S, dtype=torch.bool)[None, None]
    sub = attn[:, :, content, :][:, :, :, content]
    mask = diag[:, :, content, :][:, :, :, content]
    self_attn_w = sub.masked_fill(~mask, float("-inf")).max(dim=3)[0].mean(dim=1)
    self_attn_w = self_attn_w / (self_attn_w.sum(dim=1, keepdim=True) + 1e-8)
    # multimodal_alignment.py:30-34, 66-81: map, bridge logits, softmax over ALL positions (tau 1)
    mapped = bridge.text(hidden)
    token_attn = torch.softmax(bridge.tokens[None] @ mapped.transpose(1, 2), dim=-1)
    features = token_attn @ mapped  # multimodal_alignment.py:83-86: pooled over all positions
    # token_importance.py:51-53, 56, 63
    token_attn_w = token_attn[:, :, :-1].max(dim=1)[0]
    token_attn_w = token_attn_w / (token_attn_w.sum(dim=1, keepdim=True) + 1e-8)
    cls_attn = cls_attn / (cls_attn.sum(dim=1, keepdim=True) + 1e-8)
    importance = (cls_attn + self_attn_w + token_attn_w) / 3.0
    # token_importance.py:99-104 (min-max), :147-159 (0.5 at the EOS), :106-113 (p), :178-183 (targets only)
    lo, hi = importance.min(dim=1, keepdim=True)[0], importance.max(dim=1, keepdim=True)[0]
    span = hi - lo
    span[span == 0] = 1.0
    full = torch.full((B, S), 0.5)
    full[:, :-1] = (importance - lo) / span
    # drople.py:694-699: mask 2 = positions [0, 1 + n_ctx): SOS and the context
    target = torch.zeros(S, dtype=torch.bool)
    target[0:1 + n_ctx] = True
    prob = torch.where(target[None], p_max - full * (p_max - p_min), torch.zeros_like(full))
    return importance, prob, features


def release_layer0(learner, classname, width):
    """The release's text layer 0 for one class prompt padded to ``width`` (the batch's longest prompt).

    Layout (release/models/drople.py:140-176, 629-636, with no LLM tokens): the processor pads with
    its pad token (<|endoftext|> for CLIP) and masks the padding; the sample's own EOS is masked too and
    a copy of its embedding goes last, unmasked. Positions 1..n_ctx hold the layer-0 context (the
    release's parameter is token + position embedding; ours adds the position at use, same input).
    Returns (attention (1, H, S, S), block output (1, S, D)) with padding rows computed as HF CLIP does.
    """
    clip = learner.clip
    n = learner.n_ctx
    ids = open_clip.tokenize([" ".join(["X"] * n) + " " + classname])[0]
    eos = int(ids.argmax())
    ids = ids[:width].clone()
    ids[eos + 1:] = EOS_ID  # the processor's padding
    with torch.no_grad():
        emb = clip.token_embedding(ids) + clip.positional_embedding[:width]
        emb[1:1 + n] = learner.text_ctx[0] + clip.positional_embedding[1:1 + n]
        emb[-1] = emb[eos]  # drople.py:635: the EOS (its embedding at eos_loc) appended last
        keep = torch.ones(width, dtype=torch.bool)
        keep[eos:width - 1] = False  # drople.py:140-142, 161, 173: padding and the moved EOS are masked keys
        x = emb[None]
        block = clip.transformer.resblocks[0]
        H = block.attn.num_heads
        D = x.shape[-1]
        q, k, _ = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias).split(D, dim=-1)
        q = q.view(1, width, H, D // H).transpose(1, 2)
        k = k.view(1, width, H, D // H).transpose(1, 2)
        allowed = torch.ones(width, width, dtype=torch.bool).tril() & keep[None, :]  # causal + key padding
        bias = torch.zeros(width, width).masked_fill(~allowed, float("-inf"))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H) + bias, dim=-1)
        out = block(x, attn_mask=bias[None].expand(H, -1, -1))
    return attn, out


# --------------------------------------------------------------------------
# 1. SOS is never a perturbation target
# --------------------------------------------------------------------------


def test_sos_is_never_a_target_the_release_perturbs_it():
    learner = make(EQUAL)  # one token length: no padding, so the content sets of both rules agree
    cfg = get_state(learner.clip).config
    n = learner.n_ctx
    release_sos_expected = 0.0  # expected number of SOS perturbations under the release's rule
    ctx_selected = draws = 0
    for _ in range(10):
        _, steps = text_forward(learner)
        assert sorted(steps) == list(cfg.text_layers)
        for layer, rec in steps.items():
            out = rec.out
            S = out.eligible.shape[1]
            # (b) ours: exactly the context positions are eligible; SOS never has a probability or a draw
            ctx = torch.zeros(S, dtype=torch.bool)
            ctx[1:1 + n] = True
            assert torch.equal(out.eligible, ctx[None].expand_as(out.eligible) & out.valid), layer
            assert torch.all(out.drop_prob[:, 0] == 0) and not out.drop_mask[:, 0].any()
            ctx_selected += int(out.drop_mask[:, 1:1 + n].sum())
            draws += out.drop_mask.shape[0]
            # (a) the release: targets [0, 1 + n_ctx) (release/models/drople.py:694-699) with
            # p = p_max - norm(I) (p_max - p_min) (release/utils/token_importance.py:99-113, 182-183), I
            # being the same score as ours here (SOS is content in both). Its SOS probability:
            content = out.valid & (torch.arange(S)[None] != rec.tokens.anchor[:, None])
            imp = out.importance
            lo = imp.masked_fill(~content, float("inf")).amin(dim=1)
            hi = imp.masked_fill(~content, float("-inf")).amax(dim=1)
            span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
            p_sos = cfg.p_max - (imp[:, 0] - lo) / span * (cfg.p_max - cfg.p_min)
            assert torch.all(p_sos >= cfg.p_min - 1e-6)
            release_sos_expected += float(p_sos.sum())
    # (c) the draws do fire on the context (so a selectable SOS would be seen), never on SOS; the release's
    # rule would have perturbed SOS this many times on the same scores
    rate = release_sos_expected / draws
    print(f"\nSOS: release expected {release_sos_expected:.1f} SOS perturbations in {draws} (sample, layer) draws "
          f"(rate {rate:.3f}); ours 0; ours perturbed {ctx_selected} context tokens")
    assert ctx_selected > 0
    assert release_sos_expected > 20  # >= p_min = 0.1 per draw, 270 draws


# --------------------------------------------------------------------------
# 2. padding is not content: a class's features do not depend on the other class names
# --------------------------------------------------------------------------


def test_release_text_rule_without_padding_is_ours():
    """The transcription above, on a prompt without padding, gives drople_fast's layer-0 scores and
    probabilities (real code path): the two rules differ only by padding and SOS."""
    learner = make([A, SHORT])
    cfg = get_state(learner.clip).config
    n = learner.n_ctx
    _, steps = text_forward(learner)
    out = steps[0].out
    width = int(out.valid[0].sum())  # A is the longest prompt: its width is the batch's
    attn, hidden = release_layer0(learner, A, width)
    imp, prob, feats = release_text_iwtd(attn, hidden, get_state(learner.clip).bridge, n, cfg.p_min, cfg.p_max)
    torch.testing.assert_close(out.importance[0, :width - 1], imp[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.drop_prob[0, 1:1 + n], prob[0, 1:1 + n], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.bridge_features[0], feats[0], rtol=1e-4, atol=1e-5)
    # the SOS deviation, on the same numbers: the release gives SOS a probability, ours 0
    assert float(prob[0, 0]) >= cfg.p_min and float(out.drop_prob[0, 0]) == 0.0


def test_padding_changes_the_releases_features_not_ours():
    short, long_ = make([A, SHORT]), make([A, LONG])
    cfg = get_state(short.clip).config
    n = short.n_ctx
    f_short, s_short = text_forward(short)
    f_long, s_long = text_forward(long_)
    width = int(s_short[0].out.valid[0].sum())  # A's own length
    assert s_long[0].out.valid.shape[1] > width and not s_long[0].out.valid[0, width:].any()  # A is padded

    # (a) the release: A's drop probabilities and bridge features move when the other name gets longer
    padded_width = s_long[0].out.valid.shape[1]
    bridge = get_state(short.clip).bridge
    _, p0, g0 = release_text_iwtd(*release_layer0(short, A, width), bridge, n, cfg.p_min, cfg.p_max)
    _, p1, g1 = release_text_iwtd(*release_layer0(long_, A, padded_width), bridge, n, cfg.p_min, cfg.p_max)
    dp = float((p1[0, :1 + n] - p0[0, :1 + n]).abs().max())
    dg = float((g1 - g0).norm() / g0.norm())
    print(f"\npadding: {padded_width - width} padding positions after A's EOS; the release's A drop probabilities "
          f"move by up to {dp:.4f} (p in [{cfg.p_min}, {cfg.p_max}]), its layer-0 bridge features by {dg:.1%}")
    assert dp > 1e-2 and dg > 1e-2

    # (b) ours (the real tower, perturb mode with noise on): every layer's scores, probabilities, draws and
    # bridge features of A, and A's final text features, are the same with either class list
    assert sorted(s_short) == sorted(s_long) == list(cfg.text_layers)
    for layer in cfg.text_layers:
        a, b = s_short[layer].out, s_long[layer].out
        w = int(a.valid[0].sum())
        assert int(b.valid[0].sum()) == w and not b.valid[0, w:].any()
        torch.testing.assert_close(b.importance[0, :w], a.importance[0, :w], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b.drop_prob[0, :w], a.drop_prob[0, :w], rtol=1e-5, atol=1e-7)
        assert torch.equal(b.drop_mask[0, :w], a.drop_mask[0, :w]), layer
        assert torch.all(b.importance[0, w:] == 0) and torch.all(b.drop_prob[0, w:] == 0)
        torch.testing.assert_close(b.bridge_features[0], a.bridge_features[0], rtol=1e-5, atol=1e-6)
    # (c) so the class's text features do not depend on the other names (noise included)
    torch.testing.assert_close(f_long[0], f_short[0], rtol=1e-5, atol=1e-6)
    assert sum(int(s_short[layer].out.drop_mask[0].sum()) for layer in cfg.text_layers) > 0  # noise was applied


# --------------------------------------------------------------------------
# noise disabled: perturb mode with sigma 0 is the release with --noise_injection_sigma 0
# --------------------------------------------------------------------------


def test_sigma_zero_turns_only_the_noise_off():
    """The release returns the hidden states unchanged when sigma <= 0 (release/utils/token_importance.py:141),
    after its scores and bridge features are computed (release/models/drople.py:670-680, 779-787): with
    sigma 0 our perturb mode leaves every feature as mode "off" does and still gives probabilities,
    bridge features and the alignment loss."""
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0])
    feats = {}
    for name, mode, sigma in (("off", "off", 0.03), ("quiet", "perturb", 0.0), ("noisy", "perturb", 0.03)):
        learner = make(EQUAL, mode=mode, sigma=sigma)
        text, steps = text_forward(learner)
        with torch.no_grad():
            image = learner.clip.encode_image(images)
        feats[name] = (text.detach(), image, steps)
        if name == "quiet":
            _, terms = learner(images, labels, epoch=0, total_epochs=2)
            assert float(terms["align"].detach()) > 0 and torch.isfinite(terms["total"].detach())
    torch.testing.assert_close(feats["quiet"][0], feats["off"][0], rtol=0, atol=0)
    torch.testing.assert_close(feats["quiet"][1], feats["off"][1], rtol=0, atol=0)
    steps = feats["quiet"][2]
    n = 4
    assert all(torch.all(s.out.drop_prob[:, 1:1 + n] > 0) for s in steps.values())
    assert sum(int(s.out.drop_mask.sum()) for s in steps.values()) > 0  # tokens were selected, not scaled
    # the same selections with sigma 0.03 do move the features, so the comparison above can fail
    assert not torch.allclose(feats["noisy"][0], feats["off"][0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(feats["noisy"][1], feats["off"][1], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# 3. exact entropy: the release's 1e-5 inside the log is negligible
# --------------------------------------------------------------------------

ENTROPY_EPS = 1e-5  # release/utils/residual_entropy_loss.py:13


def release_entropy(p):
    # release/utils/residual_entropy_loss.py:5-16
    return torch.sum(-p * torch.log(p + ENTROPY_EPS), dim=1)


def release_demix(feat1, feat2, lam, text_features=None, image_features=None, logit_scale=None):
    # release/utils/residual_entropy_loss.py:36-66
    epsilon = 1e-3
    nume = feat1 - feat2 * lam
    denomi = 1 - lam
    if denomi < epsilon:
        denomi += epsilon
    if 1 - denomi < epsilon:
        denomi -= epsilon
    feat_desc = nume / denomi
    if text_features is None:
        out = logit_scale * (image_features @ feat_desc.t())
    else:
        out = logit_scale * (feat_desc @ text_features.t())
    return torch.mean(release_entropy(torch.softmax(out, dim=1)))


def clip_like_features(B, C, D, seed):
    """Unit features with CLIP ViT-B/16's geometry: text-text cosines about 0.65, image-text about 0.25,
    the true class about 0.05 higher; prompted features at cosine ~0.999 to the frozen ones (the L1
    terms keep them there)."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda *shape: F.normalize(torch.randn(*shape, D, generator=g), dim=-1)  # noqa: E731
    common = unit(1)
    txt_f = F.normalize(0.8 * common + 0.6 * unit(C), dim=-1)
    labels = torch.randint(0, C, (B,), generator=g)
    img_f = F.normalize(0.2 * common + 0.15 * txt_f[labels] + 0.95 * unit(B), dim=-1)
    txt_d = F.normalize(txt_f + 0.05 * unit(C), dim=-1)
    img_d = F.normalize(img_f + 0.05 * unit(B), dim=-1)
    return img_f, img_d, txt_f, txt_d


@pytest.mark.parametrize("C", [10, 50, 100, 500])  # 500: ImageNet's base classes
def test_exact_entropy_differs_from_the_releases_by_less_than_the_bound(C):
    img_f, img_d, txt_f, txt_d = clip_like_features(B=32, C=C, D=512, seed=C)
    cos = img_f @ txt_f.t()
    assert 0.1 < float(cos.mean()) < 0.45  # CLIP-like cosines
    scale = math.exp(4.605)  # the release's clamped logit scale at its bound
    w = LossWeights()
    worst = 0.0
    for epoch in (0, 1, 4):  # lambda 0 at the start, then towards lambda0
        lam = residual_lambda(epoch, 5, w.lambda0)
        # (b) ours: the real loss code, exact entropy
        h_txt, h_vis = residual_entropy(img_f, img_d, txt_f, txt_d, scale, lam)
        # (a) the release: Demix with its epsilon (release/models/drople.py:907-914)
        r_txt = release_demix(txt_d, txt_f, lam, image_features=img_f, logit_scale=scale)
        r_vis = release_demix(img_d, img_f, lam, text_features=txt_f, logit_scale=scale)
        for ours, rel in ((h_txt, r_txt), (h_vis, r_vis)):
            diff = float(ours - rel)
            # -p log(p + eps) <= -p log p, and p log(1 + eps/p) <= eps: 0 <= H - H_release <= C eps per row
            assert 0 < diff <= C * ENTROPY_EPS, (diff, C * ENTROPY_EPS)
            worst = max(worst, diff)
    # (c) in the loss: -entropy_weight (H_txt + H_vis), so the total moves by at most 2 * 0.05 * C * eps
    loss_bound = 2 * w.entropy * C * ENTROPY_EPS
    print(f"\nentropy, C={C}: largest H - H_release {worst:.2e} nats (bound C*eps = {C * ENTROPY_EPS:.0e}); "
          f"effect on the total loss <= {2 * w.entropy * worst:.2e} (bound {loss_bound:.0e})")
    assert 2 * w.entropy * worst <= loss_bound
