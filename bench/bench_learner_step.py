"""The full DroPLe training step on a ViT-B/16 CLIP, per IWTD mode and precision (pytest-benchmark).

    python -m pytest bench/bench_learner_step.py --benchmark-only --benchmark-json=bench/results/learner_step.json
    python bench/report_learner_step.py bench/results/learner_step.json     # Markdown table + CSV

One step is what ``drople-fast train`` runs per batch: the DroPLe learner
(drople_fast.training.learner.DroPLe, every default the release's: deep text
prompts over all classes, deep visual prompts, LoRA on vision layers 6-11, the
bridge) forward over the image batch and the class prompts, the frozen teacher,
every loss term, backward and an AdamW step. Batch 4 (the release's few-shot
batch; BENCH_BATCH overrides), 24, 100 and 500 classes (BENCH_CLASSES; CIFAR-100's
names up to 100, ImageNet's first 500 beyond: mixed token lengths), random ViT-B/16
weights (the weights do not change the cost), torch's default thread count.
BENCH_CASES (e.g. ``perturb/fp32/recomputed,drop/bf16/cached``) runs a subset of the cases.

Cases (``case`` = mode / precision / teacher):

* mode: ``off``, ``perturb`` (the release's IWTD), ``drop``, ``drop_fixed`` (keep 0.5 after layer 0);
* precision: ``fp32``, or ``bf16`` autocast (CPU: ``torch.autocast("cpu")``, CUDA: ``"cuda"``);
* teacher: ``recomputed`` -- the frozen teacher's image forward runs every step, as the release
  does -- or ``cached`` -- its features are computed once per training image (the learner's
  ``teacher_features`` argument, what the trainer's teacher cache feeds it).

The baseline of every ratio is ``perturb / fp32 / recomputed`` (the release's recipe and cost)
at the same class count, measured in the same run.

After the timed rounds, one untimed breakdown per case times the parts of a step on their own
(median of 3 each): the student text tower over all class prompts (forward + backward), the
student image tower (forward + backward), the teacher's image forward; ``rest`` = step minus
those parts (losses and bridge alignment, their backward, the optimizer).
"""
from __future__ import annotations

import copy
import os
import statistics
import time

import pytest
import torch

from drople_fast.clip.config import IWTDConfig
from drople_fast.training.precision import autocast

from classnames import classnames  # names of mixed token lengths
from machine import machine_record, sync
from smoke import SMOKE, env_int, vit_b16

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = env_int("BENCH_BATCH", 4, smoke=2)
ROUNDS = env_int("BENCH_ROUNDS", 3, smoke=1)
WARMUP = env_int("BENCH_WARMUP", 1, smoke=0)
CLASS_COUNTS = [int(c) for c in os.environ.get("BENCH_CLASSES", "4" if SMOKE else "24,100,500").split(",")]
BASELINE = ("perturb", "fp32", "recomputed")

CASES = [(mode, precision, "cached") for mode in ("off", "perturb", "drop", "drop_fixed")
         for precision in ("fp32", "bf16")] + [BASELINE, ("drop", "bf16", "recomputed")]
if os.environ.get("BENCH_CASES"):
    CASES = [tuple(c.split("/")) for c in os.environ["BENCH_CASES"].split(",")]
    unknown = [c for c in CASES if len(c) != 3]
    if unknown:
        raise ValueError(f"BENCH_CASES entries must be mode/precision/teacher, got {unknown}")



def _iwtd_config(mode: str) -> IWTDConfig:
    if mode == "drop_fixed":
        return IWTDConfig(mode=mode, keep_ratio=0.5, vision_layers=[0])
    return IWTDConfig(mode=mode)


def _autocast(precision: str):
    return autocast(precision, DEVICE)  # the trainer's own precision -> autocast mapping


def _median_time(fn, repeats: int = env_int("BENCH_PART_REPEATS", 3, smoke=1)) -> float:
    times = []
    for _ in range(repeats):
        sync(DEVICE)
        start = time.perf_counter()
        fn()
        sync(DEVICE)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.fixture(scope="module")
def base_clip():
    return vit_b16(DEVICE)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, 224, 224, generator=g).to(DEVICE)
    return images, g


@pytest.mark.parametrize("classes", CLASS_COUNTS)
@pytest.mark.parametrize("mode,precision,teacher", CASES, ids=["/".join(c) for c in CASES])
def test_learner_step(benchmark, base_clip, batch, classes, mode, precision, teacher):
    from drople_fast.training.learner import DroPLe

    images, g = batch
    labels = torch.randint(0, classes, (BATCH,), generator=g).to(DEVICE)
    torch.manual_seed(1)
    learner = DroPLe(copy.deepcopy(base_clip), classnames(classes), iwtd=_iwtd_config(mode)).to(DEVICE)
    learner.train()
    params = [p for _, p in learner.trainable_named_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    learner.teacher_text_features()  # once per class list in training too
    cached = learner.teacher_image_features(images) if teacher == "cached" else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(precision):
            _, terms = learner(images, labels, epoch=1, total_epochs=20, teacher_features=cached)
        terms["total"].backward()
        optimizer.step()
        sync(DEVICE)

    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)

    def text_part():
        with _autocast(precision):
            out = learner.text_features()
        out.sum().backward()

    def image_part():
        with _autocast(precision):
            out = learner.image_features(images)
        out.sum().backward()

    def teacher_part():
        with _autocast(precision):
            learner.teacher_image_features(images)

    parts = dict(text_s=_median_time(text_part), image_s=_median_time(image_part),
                 teacher_s=_median_time(teacher_part) if teacher == "recomputed" else 0.0)
    optimizer.zero_grad(set_to_none=True)
    benchmark.extra_info.update(
        kind="learner_step", mode=mode, precision=precision, teacher=teacher, classes=classes, batch=BATCH,
        **machine_record(DEVICE), **parts)
