"""Prompts-only export (`drople-fast export RUN --out FILE`) and `load_prompts`: bit-exact round trip."""
import json
import os

import pytest
import torch

from drople_fast.training import load_prompts, trainer
from drople_fast.training.cli import main
from drople_fast.training.data import write_synthetic_coop_dataset
from drople_fast.training.export import FORMAT, read_prompts, save_prompts
from run_config import tiny_run_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    root = str(base / "data")
    write_synthetic_coop_dataset(root, num_classes=4, images_per_class=8, seed=0)
    run = base / "run"
    trainer.train(tiny_run_config(root, run, epochs=2))
    return root, run


def _reference_learner(run):
    """The learner exactly as `drople-fast eval` rebuilds it from the run's checkpoint."""
    from drople_fast.clip.patch import load_patch_state_dict

    ckpt = trainer.load_checkpoint(str(run / "checkpoint.pt"))
    cfg = trainer.TrainConfig.from_dict(ckpt["config"])
    clip = trainer.build_clip(cfg.model, cfg.pretrained, torch.device("cpu"))
    learner = trainer.make_learner(cfg, clip, ckpt["classnames"])
    learner.load_prompt_state_dict(ckpt["learner"])
    load_patch_state_dict(clip, ckpt["patch"])
    return learner.eval(), ckpt


def test_export_round_trip_is_bit_exact(trained, tmp_path, capsys):
    _, run = trained
    out = tmp_path / "prompts.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "load_prompts" in capsys.readouterr().out
    learner_state, bridge_state, config, classnames = read_prompts(str(out))
    reference, ckpt = _reference_learner(run)
    # the file holds exactly the trainable learner tensors and the bridge, bit for bit; no CLIP weight
    assert set(learner_state) == set(ckpt["learner"]) and set(bridge_state) == set(ckpt["patch"]["bridge"])
    for name, value in ckpt["learner"].items():
        assert learner_state[name].dtype == value.dtype and torch.equal(learner_state[name], value), name
    for name, value in ckpt["patch"]["bridge"].items():
        assert torch.equal(bridge_state[name], value), name
    assert config == ckpt["config"] and classnames == ckpt["classnames"] == ["red circle", "green square"]
    clip_numel = sum(p.numel() for p in reference.clip.parameters()) - sum(v.numel() for v in bridge_state.values())
    assert sum(v.numel() for v in learner_state.values()) < clip_numel / 10
    # load for inference: same logits as the checkpoint's learner, bit for bit
    learner = load_prompts(str(out))
    assert not learner.training and learner.classnames == classnames
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(learner(images), reference(images))
    for (name, mine), (_, theirs) in zip(learner.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(mine, theirs), name
    # other class names: the learned prompts apply to them
    other = load_prompts(str(out), classnames=["blue cross", "red circle", "white ring"])
    with torch.no_grad():
        logits = other(images)
        assert logits.shape == (3, 3)
        torch.testing.assert_close(logits[:, 1], reference(images)[:, 0])  # another text batch: not bitwise


def test_export_of_the_evaluated_run_matches_metrics(trained, tmp_path):
    from drople_fast.training.evaluation import evaluate_plan

    root, run = trained
    out = tmp_path / "p.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    cfg = trainer.TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    learner = load_prompts(str(out))
    accs, _ = evaluate_plan(learner, trainer.make_plan(cfg), cfg, torch.device("cpu"), 32)
    metrics = json.loads((run / "metrics.json").read_text())
    assert accs["base_acc"] == metrics["base_acc"] and accs["novel_acc"] == metrics["novel_acc"]


def test_bad_exports_are_named(trained, tmp_path, capsys):
    _, run = trained
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors file"):
        load_prompts(str(junk))
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match=f"not a drople_fast prompts export .*expected '{FORMAT}'"):
        load_prompts(str(other))
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        load_prompts(str(tmp_path / "none.safetensors"))
    # a run trained on local weights that are not here: named, with the way out
    ckpt = trainer.load_checkpoint(str(run / "checkpoint.pt"))
    cfg = dict(ckpt["config"], pretrained=str(tmp_path / "gone.pt"))
    moved = tmp_path / "moved.safetensors"
    save_prompts(str(moved), ckpt["learner"], ckpt["patch"]["bridge"], cfg, ckpt["classnames"])
    with pytest.raises(FileNotFoundError, match="gone.pt, not found here; pass clip_weights="):
        load_prompts(str(moved))
    # the CLI: a missing run is one line
    assert main(["export", str(tmp_path / "no-run"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.safetensors")


@pytest.mark.slow
def test_vit_b16_export_is_a_few_mb(tmp_path):
    """ViT-B/16 (random weights, no download): the export holds prompts, LoRA and bridge only."""
    import open_clip

    from drople_fast.clip.patch import get_state
    from drople_fast.training.build import make_learner
    from drople_fast.training.pretrained import quiet_random_init

    with quiet_random_init():
        clip = open_clip.create_model("ViT-B-16", pretrained=None)
    cfg = trainer.TrainConfig(model="ViT-B-16")
    learner = make_learner(cfg, clip, ["a", "b"])
    size = save_prompts(str(tmp_path / "p.safetensors"), learner.prompt_state_dict(),
                        get_state(clip).bridge.state_dict(), cfg, ["a", "b"])
    clip_bytes = sum(p.numel() * p.element_size() for p in clip.parameters())
    assert size == os.path.getsize(tmp_path / "p.safetensors") and size < 10e6 and size < clip_bytes / 50
