"""The DroPLe release's recipe is the default: every item pinned to the release file:line it mirrors.

The release (MIT, /work/shared/release, cited as release/<file>:<line>) is never imported: where a test
needs its behaviour, the few lines concerned are transcribed here, with the citation.
"""
from __future__ import annotations

import math

import open_clip
import pytest
import torch

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


# --------------------------------------------------------------------------
# item 6: LoRA as launched
# --------------------------------------------------------------------------


def test_lora_on_by_default_as_launched():
    import argparse

    from drople_fast.training import cli
    from drople_fast.training.learner import LoRA
    from drople_fast.training.trainer import TrainConfig, make_learner

    # release/scripts/launch/launch.sh:42-44 (--lora_rank 8 --lora_alpha 16 --lora_dropout 0.1) and :60-61
    # (--v_lora_start 6 --v_lora_end 12): peft LoRA on q_proj and v_proj of vision layers 6..11
    # (release/models/drople.py:92-97), A kaiming_uniform_(a=sqrt(5)) and B zero (peft's init_lora_weights=True).
    cfg = TrainConfig()
    assert cfg.lora_rank == 8
    p = argparse.ArgumentParser()
    cli._add_train_options(p)
    args = p.parse_args(["--dataset", "Synthetic", "--root", "data", "--output-dir", "out"])
    assert cli._config(args, "Synthetic", 1, "out", False).lora_rank == 8  # the CLI's default is TrainConfig's
    torch.manual_seed(0)
    learner = make_learner(cfg, create_tiny_clip(seed=0), CLASSES)
    assert sorted(learner.lora, key=int) == [str(i) for i in range(6, 12)]
    for lora in learner.lora.values():
        assert isinstance(lora, LoRA) and lora.rank == 8 and lora.scale == 2.0 and lora.dropout == 0.1
        for a in (lora.q_a, lora.v_a):
            assert a.shape == (8, 64)
            assert_uniform(a, kaiming_bound(64))
        assert not lora.q_b.any() and not lora.v_b.any()
    lora_params = sum(p.numel() for n, p in learner.trainable_named_parameters() if n.startswith("lora."))
    assert lora_params == 6 * 2 * 2 * 8 * 64  # 6 layers, q and v, A (8, D) and B (D, 8)


def test_teacher_image_features_ignore_lora_the_students_see_it():
    # The release's teacher is NOT LoRA-free: peft's LoraModel wraps clip_model.vision_model in place
    # (release/models/drople.py:180-186), and the "frozen" features come from that same module
    # (`self.clip_model.vision_model(img)`, :848-851), so its teacher drifts with the student's LoRA. Ours runs
    # with LoRA disabled (DroPLe.teacher_mode): a kept bug fix (docs: hd-table row 6).
    learner = make("drop", lora_rank=8)
    learner.train()  # LoRA dropout would act here if the teacher ran through LoRA
    x = images()
    teacher0 = learner.teacher_image_features(x)
    learner.eval()
    with torch.no_grad():
        student0 = learner.image_features(x)
        for lora in learner.lora.values():
            lora.q_b.normal_()
            lora.v_b.normal_()
        student1 = learner.image_features(x)
    learner.train()
    assert torch.equal(learner.teacher_image_features(x), teacher0)
    assert (student1 - student0).norm(dim=-1).min() > 0.1, (student1 - student0).norm(dim=-1)
    assert all(lora.enabled for lora in learner.lora.values())  # re-enabled after the teacher


# --------------------------------------------------------------------------
# item 7: optimiser, parameter groups and schedules
# --------------------------------------------------------------------------


def release_lrs(lr: float, lora_lr: float, epochs: int, steps: int):
    """[(prompt group lr, LoRA group lr)] at every batch of a release run, transcribed:
    get_cosine_schedule_lambda_with_warmup (release/train_drople.py:40-47) per group with min_lrs and base_lrs
    (:243-244), num_warmup_steps=1, num_training_steps=max(max_epochs, 20) + 1 (:247-253), LambdaLR (:88),
    stepped before batch len(trainloader) // 10 of epoch 0 (:369-370) and after every epoch (:383-384)."""
    def lambda_(min_lr, base_lr, num_warmup_steps, num_training_steps, num_cycles=0.5):
        def lr_lambda(current_step):
            if current_step < num_warmup_steps:
                return max(min_lr / base_lr, float(current_step) / float(max(1, num_warmup_steps)))
            progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
            return max(min_lr / base_lr, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))
        return lr_lambda

    min_lrs, base_lrs = [1e-5, max(lora_lr / lr * 1e-5, 5e-6)], [lr, lora_lr]
    lambdas = [lambda_(m, b, 1, max(epochs, 20) + 1) for m, b in zip(min_lrs, base_lrs)]
    current, out = 0, []
    for epoch in range(epochs):
        for idx in range(steps):
            if epoch == 0 and idx == steps // 10:
                current += 1
            out.append(tuple(b * f(current) for b, f in zip(base_lrs, lambdas)))
        current += 1
    return out


def run_epochs(optimizer, scheduler, epochs: int, steps: int):
    """Drive drople_fast's train_one_epoch with a stand-in model: the group lrs and the epoch argument at
    every batch."""
    from drople_fast.training.trainer import train_one_epoch

    w = optimizer.param_groups[0]["params"][0]
    seen = []

    def model(x, y, epoch, total, **teacher):
        seen.append((tuple(g["lr"] for g in optimizer.param_groups), epoch))
        return None, {"total": (w * 0).sum() + x.sum()}

    # items as TrainImageDataset's: (student, teacher, label, index)
    loader = [(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))] * steps
    for epoch in range(epochs):
        train_one_epoch(model, loader, optimizer, scheduler, torch.device("cpu"), "fp32", epoch, epochs)
    return seen


def two_groups(lr=2e-4, lora_lr=2e-5):
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    return torch.optim.AdamW([{"params": [params[0]], "lr": lr}, {"params": [params[1]], "lr": lora_lr}],
                             lr=lr, weight_decay=5e-5)


@pytest.mark.parametrize("epochs,steps", [(20, 25), (5, 25), (30, 12), (3, 4)])
def test_lr_of_each_group_at_every_batch_is_the_releases(epochs, steps):
    from drople_fast.training.trainer import build_scheduler

    optimizer = two_groups()
    seen = run_epochs(optimizer, build_scheduler(optimizer, epochs), epochs, steps)
    assert [lrs for lrs, _ in seen] == release_lrs(2e-4, 2e-5, epochs, steps)


@pytest.mark.parametrize("epochs", [20, 5])
def test_lr_per_epoch_golden_values(epochs):
    from drople_fast.training.trainer import build_scheduler

    steps = 25
    optimizer = two_groups()
    lrs = [lrs for lrs, _ in run_epochs(optimizer, build_scheduler(optimizer, epochs), epochs, steps)]
    # From the release's formulas (release/train_drople.py:40-47,243,247-253,369-370,383-384) by hand: the first
    # tenth of epoch 0 runs at the floors (warm-up step 0), the rest of epoch 0 at the base lrs; epoch e >= 1 at
    # cosine progress e / max(E, 20); floors 1e-5 and max(2e-5 / 2e-4 * 1e-5, 5e-6) = 5e-6.
    cos = lambda e: 0.5 * (1 + math.cos(math.pi * e / 20))  # noqa: E731
    assert lrs[0] == lrs[steps // 10 - 1] == pytest.approx((1e-5, 5e-6), rel=1e-12)
    assert lrs[steps // 10] == lrs[steps - 1] == pytest.approx((2e-4, 2e-5), rel=1e-12)
    for e in range(1, epochs):
        want = (max(2e-4 * cos(e), 1e-5), max(2e-5 * cos(e), 5e-6))
        assert lrs[e * steps] == lrs[(e + 1) * steps - 1] == pytest.approx(want, rel=1e-12), e
    if epochs == 20:
        assert lrs[1 * steps] == pytest.approx((1.98769e-4, 1.98769e-5), rel=1e-5)
        assert lrs[10 * steps] == pytest.approx((1e-4, 1e-5), rel=1e-12)
        assert lrs[15 * steps] == pytest.approx((2.9289e-5, 5e-6), rel=1e-4)  # LoRA at its floor from epoch 14
        assert lrs[19 * steps] == pytest.approx((1e-5, 5e-6), rel=1e-12)  # both floored (bare cosine: 1.2e-6)
    else:  # E < 20: the cosine still spans 20 epochs, so a 5-epoch run ends at 90 % of the base lr
        assert lrs[4 * steps] == pytest.approx((1.80902e-4, 1.80902e-5), rel=1e-5)


def test_learner_gets_the_integer_epoch():
    # release/train_drople.py:375 `model_engine(data, current_epoch=epoch)`, read by the residual-entropy λ at
    # release/models/drople.py:907-910: the epoch is constant within an epoch (no fractional epoch).
    from drople_fast.training.trainer import build_scheduler

    optimizer = two_groups()
    seen = run_epochs(optimizer, build_scheduler(optimizer, 3), 3, 5)
    assert [e for _, e in seen] == [0] * 5 + [1] * 5 + [2] * 5
    assert all(type(e) is int for _, e in seen)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from drople_fast.training.data import write_synthetic_coop_dataset

    root = str(tmp_path_factory.mktemp("data"))
    write_synthetic_coop_dataset(root, num_classes=4, images_per_class=16, image_size=32, seed=0)
    return root


def small_config(root, out, **kw):
    from drople_fast.training.trainer import TrainConfig

    base = dict(dataset="Synthetic", root=root, protocol="base2novel", shots=4, batch_size=2, output_dir=str(out),
                progress=False, num_threads=1, fewshot_cache=str(out) + "-cache")
    base.update(kw)
    return TrainConfig(**base)


def test_train_defaults_optimiser_and_parameter_groups_are_the_releases(synthetic_root, tmp_path):
    from drople_fast.training.trainer import TrainConfig, build_clip, build_training, make_plan

    # base-to-novel launch: 16 shots, 20 epochs (launch.sh:7-8), lr 2e-4, LoRA lr 2e-5 (:50,57), batch 4 and
    # weight decay 5e-5 (release/flags.py:15,18; configs/llava/zero-shot/dtd_llama_7b.yml:8)
    d = TrainConfig()
    assert (d.shots, d.epochs, d.batch_size, d.lr, d.lora_lr, d.weight_decay) == (16, 20, 4, 2e-4, 2e-5, 5e-5)
    cfg = small_config(synthetic_root, tmp_path / "run")
    setup = build_training(cfg, make_plan(cfg), build_clip(cfg.model), torch.device("cpu"))
    opt, learner = setup.optimizer, setup.learner
    # torch.optim.AdamW with betas (0.9, 0.999) (release/flags.py:78; train_drople.py:23,225-227): torch's eps
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    # two groups (release/train_drople.py:94-112): names with 'lora' at lora_lr, every other trainable parameter
    # (prompts, bridge, logit scale: release/models/drople.py:410 is in the first) at lr; weight decay on both
    named = dict(learner.trainable_named_parameters())
    ids = [{id(p) for p in g["params"]} for g in opt.param_groups]
    assert ids[1] == {id(p) for n, p in named.items() if "lora" in n}
    assert ids[0] == {id(p) for n, p in named.items() if "lora" not in n}
    assert id(learner.logit_scale) in ids[0] and len(ids[1]) == 6 * 4
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-5, 5e-5]
    assert [g["initial_lr"] for g in opt.param_groups] == [2e-4, 2e-5]
    # warm-up step 0: both groups start at their floors (release/train_drople.py:44, min_lrs :243)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-5, 5e-6], rel=1e-12)
    # without LoRA: one group, floored at 1e-5 (release/train_drople.py:240-241 --freeze_vit)
    cfg0 = small_config(synthetic_root, tmp_path / "run0", lora_rank=0)
    setup0 = build_training(cfg0, make_plan(cfg0), build_clip(cfg0.model), torch.device("cpu"))
    assert len(setup0.optimizer.param_groups) == 1
    assert setup0.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5, rel=1e-12)


def test_resume_keeps_the_release_schedule_bit_exact(synthetic_root, tmp_path, monkeypatch):
    from drople_fast.training import trainer

    # shots 8 of 2 base classes at batch 1: 16 steps, so the mid-epoch-0 step falls on batch 1, not 0
    kw = dict(epochs=3, shots=8, batch_size=1, iwtd={"mode": "off"})
    full = tmp_path / "full"
    trainer.train(small_config(synthetic_root, full, **kw))
    stopped = tmp_path / "stopped"
    check = trainer.check_finite_weights

    def stop_after_first_epoch(learner, epoch):
        check(learner, epoch)
        if epoch == 1:
            raise KeyboardInterrupt  # after epoch 1's checkpoint, before epoch 2's
    monkeypatch.setattr(trainer, "check_finite_weights", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(small_config(synthetic_root, stopped, **kw))
    assert trainer.load_checkpoint(str(stopped / trainer.CHECKPOINT))["epoch"] == 1
    monkeypatch.setattr(trainer, "check_finite_weights", check)
    trainer.train(small_config(synthetic_root, stopped, resume=True, **kw))
    a, b = (trainer.load_checkpoint(str(d / trainer.CHECKPOINT)) for d in (full, stopped))
    assert a["scheduler"] == b["scheduler"] and a["scheduler"]["last_epoch"] == 3 + 1  # 1 mid-epoch-0 + 3 epochs
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]
    assert a["learner"].keys() == b["learner"].keys() and any(k.startswith("lora.") for k in a["learner"])
    for name, tensor in a["learner"].items():
        assert torch.equal(tensor, b["learner"][name]), name
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_demo_trains_with_the_recipes_lora(tmp_path, monkeypatch):
    # The toy demo shows the recipe, LoRA included (it used to pass lora_rank=0 explicitly).
    from drople_fast.training import demo, trainer

    seen = []

    def fake_train(cfg):
        seen.append(cfg)
        acc = {k: 50.0 for k in ("base_acc", "novel_acc", "hm")}
        return {**acc, **{"zs_" + k: v for k, v in acc.items()},
                "info": {"mode": cfg.iwtd.mode, "epochs": cfg.epochs, "train_time_s": 1.0}}
    monkeypatch.setattr(trainer, "train", fake_train)
    monkeypatch.setattr(demo, "pretrain_tiny_clip", lambda *a, **k: {"time_s": 0.0, "final_loss": 0.0})
    demo.run_demo(str(tmp_path), num_classes=4, images_per_class=8, progress=False, num_threads=None)
    assert len(seen) == len(demo.METHODS) and all(cfg.lora_rank == 8 for cfg in seen)
    seen.clear()
    demo.run_demo(str(tmp_path), num_classes=4, images_per_class=8, progress=False, num_threads=None, lora_rank=0)
    assert len(seen) == len(demo.METHODS) and all(cfg.lora_rank == 0 for cfg in seen)
