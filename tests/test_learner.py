"""DroPLe learner: forward/backward, trainable set, frozen cached teacher, LoRA naming."""
import copy
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

import drople_fast
from drople_fast.training.learner import DroPLe, templates_for
from drople_fast.training.tiny_clip import create_tiny_clip

CLASSES = ["red circle", "blue square", "green cross"]


def make(mode="drop", lora_rank=0, **kw):
    clip = create_tiny_clip(seed=0)
    torch.manual_seed(1)
    return DroPLe(clip, CLASSES, iwtd=drople_fast.IWTDConfig(mode=mode), lora_rank=lora_rank, **kw)


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("mode", ["off", "perturb", "drop", "drop_fixed"])
def test_forward_backward_and_trainable_set(mode):
    learner = make(mode, lora_rank=8)
    learner.train()
    x, y = batch()
    logits, terms = learner(x, y, epoch=0, total_epochs=2)
    assert logits.shape == (4, 3)
    assert set(terms) >= {"ce", "text_l1", "image_l1", "kl", "entropy_txt", "entropy_vis", "align", "total"}
    assert torch.isfinite(terms["total"])
    terms["total"].backward()
    with_grad = {n for n, p in learner.named_parameters() if p.grad is not None}
    allowed = ("text_ctx.", "vision_ctx.", "lora.", "clip.drople_bridge.", "logit_scale")
    assert with_grad and all(n.startswith(allowed) for n in with_grad), with_grad
    assert {f"text_ctx.{i}" for i in range(9)} | {f"vision_ctx.{i}" for i in range(6)} <= with_grad
    assert "logit_scale" in with_grad
    if mode != "off":  # the bridge only runs when IWTD does
        assert "clip.drople_bridge.tokens" in with_grad
        assert terms["align"] > 0
    frozen = [n for n, p in learner.clip.named_parameters() if not n.startswith("drople_bridge")]
    assert all(not dict(learner.clip.named_parameters())[n].requires_grad for n in frozen)
    # eval: logits only, no loss
    learner.eval()
    assert learner(x, y).shape == (4, 3)


def test_context_init_and_placeholders():
    learner = make()
    ids = open_clip.tokenize(["a photo of a"])
    emb = learner.clip.token_embedding(ids)[0, 1:5]
    assert torch.equal(learner.text_ctx[0].detach(), emb.detach())
    assert len(learner.text_ctx) == 9 and len(learner.vision_ctx) == 6
    assert learner.text_ctx[3].abs().max() <= 1 / 64 ** 0.5  # kaiming_uniform_(a=sqrt(5)), width 64
    x_id = open_clip.tokenize(["X"])[0, 1]
    assert (learner.prompt_ids[:, 1:5] == x_id).all()


def test_teacher_cached_frozen_and_equal_to_plain_clip():
    clip = create_tiny_clip(seed=0)
    plain = copy.deepcopy(clip).eval()
    learner = DroPLe(clip, CLASSES, iwtd=drople_fast.IWTDConfig(mode="drop"), lora_rank=8, dataset="DTD")
    with torch.no_grad():  # LoRA active with a non-zero update: the teacher must not see it
        for lora in learner.lora.values():
            lora.q_b.normal_()
            lora.v_b.normal_()
    learner.train()
    t1 = learner.teacher_text_features()
    assert learner.teacher_text_features() is t1  # cached per class list
    assert not t1.requires_grad
    x, _ = batch()
    with torch.no_grad():
        want = []
        for name in CLASSES:
            ids = open_clip.tokenize([t.format(name) for t in templates_for("DTD")])
            want.append(F.normalize(F.normalize(plain.encode_text(ids), dim=-1).mean(0), dim=-1))
        img = F.normalize(plain.encode_image(x), dim=-1)
    torch.testing.assert_close(t1, torch.stack(want), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(learner.teacher_image_features(x), img, atol=1e-5, rtol=1e-4)
    assert learner.training and learner.clip.training  # mode restored
    # the student does see LoRA
    learner.eval()
    assert not torch.allclose(learner.image_features(x), img, atol=1e-4)


def test_lora_keeps_state_dict_keys_and_starts_as_identity():
    clip = create_tiny_clip(seed=0)
    keys = list(clip.state_dict().keys())
    ref = {k: v.clone() for k, v in clip.state_dict().items()}
    x, _ = batch()
    with torch.no_grad():
        before = clip.eval().encode_image(x)
    learner = DroPLe(clip, CLASSES, iwtd=drople_fast.IWTDConfig(mode="off"), lora_rank=8)
    assert list(clip.state_dict().keys()) == keys
    assert all(torch.equal(ref[k], v) for k, v in clip.state_dict().items())
    assert sorted(learner.lora.keys(), key=int) == [str(i) for i in range(6, 12)]
    learner.eval()
    with torch.no_grad():
        set_hook = learner.clip._drople_patch.hook
        learner.clip._drople_patch.hook = None
        after = learner.clip.encode_image(x)  # B = 0: LoRA is the identity
        learner.clip._drople_patch.hook = set_hook
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    # an open_clip checkpoint still loads strictly
    clip.load_state_dict(ref, strict=True)


def test_loss_decreases_on_a_fixed_batch():
    learner = make("drop")
    learner.train()
    x, y = batch()
    opt = torch.optim.AdamW([p for _, p in learner.trainable_named_parameters()], lr=5e-3)
    losses = []
    for _ in range(6):
        _, terms = learner(x, y, epoch=0, total_epochs=1)
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        losses.append(float(terms["total"].detach()))
    assert losses[-1] < losses[0]


def test_descriptions_are_optional_and_averaged(tmp_path):
    plain = make("off").teacher_text_features()
    path = tmp_path / "desc.json"
    path.write_text(json.dumps({"red circle": ["a round red shape", "a red disc"]}))
    with_desc = make("off", descriptions=str(path)).teacher_text_features()
    assert not torch.allclose(plain[0], with_desc[0])
    torch.testing.assert_close(plain[1:], with_desc[1:])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        make("off", descriptions=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        make("off", descriptions=str(bad))


def test_prompt_state_dict_roundtrip_and_mismatch():
    a, b = make(lora_rank=8), make(lora_rank=8)
    with torch.no_grad():
        a.vision_ctx[0].add_(1.0)
    b.load_prompt_state_dict(a.prompt_state_dict())
    assert torch.equal(a.vision_ctx[0], b.vision_ctx[0])
    with pytest.raises(ValueError, match="does not match"):
        make(lora_rank=0).load_prompt_state_dict(a.prompt_state_dict())
