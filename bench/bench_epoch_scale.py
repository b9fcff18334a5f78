"""Wall time of a training epoch at 100 base classes on ViT-B/16: drop / bf16 / teacher cached against
perturb / fp32 / teacher recomputed (the release's cost), in one run (pytest-benchmark).

    python -m pytest bench/bench_epoch_scale.py --benchmark-only --benchmark-json=bench/results/epoch_scale.json
    python bench/report_epoch_scale.py bench/results/epoch_scale.json     # Markdown table + CSV

An epoch is what ``drople-fast train`` runs per epoch (``train_one_epoch``: the loader with the release's
per-patch RandAugment, the DroPLe learner over the 100 base classes' prompts, every loss, backward,
AdamW, the release's schedule), over a CoOp-format folder this file writes: 200 classes (CIFAR-100's
names, then ImageNet's: mixed token lengths), base-to-novel, so 100 base classes train; 1 shot
(BENCH_EPOCH_SHOTS) at batch 4: 25 steps per epoch. Random ViT-B/16 weights (the weights do not change
the cost); the images are small PNGs the preprocessing resizes to 224 px, as any dataset's are. The
teacher cache, where used, is built before the timed epochs (once per run in training too). Under
BENCH_SMOKE the tiny CLIP at 8 classes.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from drople_fast.training.fileio import atomic_json
from drople_fast.training.trainer import (TrainConfig, build_clip, build_teacher_cache, build_training, make_plan,
                                          seed_everything, train_one_epoch)

from classnames import classnames
from machine import machine_record
from smoke import SMOKE, env_int

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CLASSES = env_int("BENCH_EPOCH_CLASSES", 200, smoke=8)  # all classes; base-to-novel trains the first half
SHOTS = env_int("BENCH_EPOCH_SHOTS", 1, smoke=1)
ROUNDS = env_int("BENCH_ROUNDS", 2, smoke=1)
MODEL = "tiny" if SMOKE else "ViT-B-16"
BASELINE = ("perturb", "fp32", "recomputed")
CASES = [BASELINE, ("drop", "bf16", "cached")]


def _write_dataset(root: str, names) -> str:
    """A CoOp folder: 3 images per class (train / val / test one each), 32-px PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(names):
        folder = name.replace(" ", "_")
        os.makedirs(os.path.join(root, "images", folder), exist_ok=True)
        for i, part in enumerate(("train", "val", "test")):
            rel = f"{folder}/{i}.png"
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(root, "images", rel))
            split[part].append([rel, label, name.replace("_", " ")])
    atomic_json(os.path.join(root, "split_zhou_ScaleBench.json"), split)
    return root


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return _write_dataset(str(tmp_path_factory.mktemp("scale-data")), classnames(CLASSES) if not SMOKE else
                          [f"class {i}" for i in range(CLASSES)])


@pytest.mark.parametrize("mode,precision,teacher", CASES, ids=["/".join(c) for c in CASES])
def test_epoch_at_scale(benchmark, dataset_dir, tmp_path, mode, precision, teacher):
    cfg = TrainConfig(dataset_dir=dataset_dir, protocol="base2novel", shots=SHOTS, seed=1, epochs=5, batch_size=4,
                      model=MODEL, precision=precision, iwtd={"mode": mode}, teacher_cache=teacher == "cached",
                      output_dir=str(tmp_path / "unused"), progress=False)
    plan = make_plan(cfg)
    clip = build_clip(cfg.model, None, DEVICE)
    seed_everything(cfg.seed)
    setup = build_training(cfg, plan, clip, DEVICE)
    cache = build_teacher_cache(cfg, plan, setup, DEVICE) if cfg.teacher_cache else None
    setup.learner.teacher_text_features()  # once per class list, before the first step in training too
    setup.learner.train()
    state = {"epoch": 0}

    def one_epoch():
        _, batches, images = train_one_epoch(setup.learner, setup.loader, setup.optimizer, setup.scheduler,
                                             DEVICE, precision, state["epoch"] % cfg.epochs, cfg.epochs,
                                             teacher_cache=cache)
        state["epoch"] += 1
        return images

    warmup = 0 if SMOKE else 1
    images = benchmark.pedantic(one_epoch, rounds=ROUNDS, warmup_rounds=warmup, iterations=1)
    base_classes = len(plan.train_classnames)
    assert images == base_classes * SHOTS
    benchmark.extra_info.update(
        kind="epoch_scale", mode=mode, precision=precision, teacher=teacher, base_classes=base_classes,
        shots=SHOTS, batch=cfg.batch_size, warmup_epochs=warmup, images_per_epoch=images, steps_per_epoch=len(setup.loader),
        model=MODEL, **machine_record(DEVICE))
