"""DroPLe learner: forward/backward, trainable set, frozen cached teacher, LoRA naming."""
import copy
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

import drople_fast
import drople_fast.clip.patch
from drople_fast.training import learner as learner_module
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


@pytest.mark.parametrize("chunk", [512, 4])  # 4: a class's sentences split across text forwards
def test_teacher_cached_frozen_and_equal_to_plain_clip(monkeypatch, chunk):
    monkeypatch.setattr(learner_module, "TEACHER_TEXT_BATCH", chunk)
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


SIX = ["red circle", "blue square", "green cross", "tiny yellow star", "purple ring", "an orange triangle shape"]


@pytest.mark.parametrize("mode", ["perturb", "drop", "drop_fixed"])
def test_text_bridge_pooled_for_labels_only_gives_the_same_loss_and_gradients(mode):
    """The alignment pools the text bridge features of the labels' classes only (a repeated label, and
    classes no sample has); loss terms and every gradient equal those of pooling all classes first."""
    clip = create_tiny_clip(seed=0)
    torch.manual_seed(1)
    base = DroPLe(clip, SIX, iwtd=drople_fast.IWTDConfig(mode=mode), lora_rank=8)
    base.train()
    x, _ = batch()
    y = torch.tensor([0, 3, 3, 5])
    results = {}
    for rows in ("all", "labels"):
        learner = copy.deepcopy(base)
        learner.text_bridge_rows = rows
        torch.manual_seed(2)  # LoRA dropout; the IWTD seeds come from the copied step counters
        _, terms = learner(x, y, epoch=1, total_epochs=4)
        pooled_whole = [isinstance(v, torch.Tensor) for v in drople_fast.clip.patch.get_state(learner.clip).features["text"].values()]
        assert pooled_whole and all(pooled_whole) == (rows == "all")  # "labels" never pools all classes
        terms["total"].backward()
        grads = {n: p.grad.clone() for n, p in learner.trainable_named_parameters() if p.grad is not None}
        results[rows] = ({k: v.detach() for k, v in terms.items()}, grads)
    (t_all, g_all), (t_lab, g_lab) = results["all"], results["labels"]
    assert t_all["align"] > 0
    for k in t_all:
        torch.testing.assert_close(t_lab[k], t_all[k], atol=1e-6, rtol=1e-6, msg=lambda m: f"term {k}: {m}")
    assert set(g_lab) == set(g_all) and "clip.drople_bridge.tokens" in g_all
    # fp32 (the IWTD op has no float64): pooling B rows instead of C reorders sums in the GEMMs and
    # in the index backward, so gradients agree to float32 rounding of their largest entry.
    for n in g_all:
        scale = float(g_all[n].abs().max())
        torch.testing.assert_close(g_lab[n], g_all[n], atol=2e-6 * scale, rtol=0, msg=lambda m: f"grad {n}: {m}")


@pytest.mark.parametrize("mode", ["perturb", "drop"])
def test_text_layers_before_new_prompts_skip_the_operator_with_the_same_step(mode):
    """At a text IWTD layer whose next layer supplies new prompts, every eligible token (a prompt) is
    replaced, so the patch skips the operator there: loss terms and gradients equal those of running it
    (a step observer makes every layer run it), bit for bit."""
    from drople_fast.ops.functional import BridgeInputs, IWTDOutput

    clip = create_tiny_clip(seed=0)
    torch.manual_seed(1)
    base = DroPLe(clip, SIX, iwtd=drople_fast.IWTDConfig(mode=mode, sigma=0.5), lora_rank=8)
    base.train()
    x, _ = batch()
    y = torch.tensor([0, 3, 3, 5])
    results = {}
    for observed in (True, False):
        learner = copy.deepcopy(base)
        seen = []
        drople_fast.clip.patch.set_step_observer(learner.clip, seen.append if observed else None)
        torch.manual_seed(2)
        _, terms = learner(x, y, epoch=1, total_epochs=4)
        kinds = {layer: type(v) for layer, v in drople_fast.clip.patch.get_state(learner.clip).features["text"].items()}
        terms["total"].backward()
        grads = {n: p.grad.clone() for n, p in learner.trainable_named_parameters() if p.grad is not None}
        results[observed] = ({k: v.detach() for k, v in terms.items()}, grads, kinds)
    (t_op, g_op, k_op), (t_skip, g_skip, k_skip) = results[True], results[False]
    last = len(learner.text_ctx) - 1  # no prompts follow it: its decisions are read
    assert set(k_op.values()) == {IWTDOutput}
    assert k_skip == {layer: (IWTDOutput if layer >= last else BridgeInputs) for layer in k_op}
    for k in t_op:
        assert torch.equal(t_skip[k], t_op[k]), k
    assert set(g_skip) == set(g_op)
    for n in g_op:
        assert torch.equal(g_skip[n], g_op[n]), n


def test_bridge_features_of_rows_equal_the_rows_of_all():
    learner = make("drop")
    learner.train()
    x, y = batch()
    learner(x, y)
    rows = torch.tensor([2, 0, 2])
    some = drople_fast.clip.patch.bridge_features_of(learner.clip, "text", rows)
    whole = drople_fast.bridge_features(learner.clip)["text"]
    assert set(some) == set(whole) and some
    for layer in whole:
        torch.testing.assert_close(some[layer], whole[layer][rows], atol=1e-6, rtol=1e-6)
    # once pooled whole, the rows come from the pooled tensors
    again = drople_fast.clip.patch.bridge_features_of(learner.clip, "text", rows)
    for layer in whole:
        assert torch.equal(again[layer], whole[layer][rows])
