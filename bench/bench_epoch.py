"""Wall time per training epoch of the demo's DroPLe run, IWTD "off" vs "perturb" vs "drop", in one run
(and "drop" with the teacher's image forward every step instead of from the teacher feature cache, and
"drop" with the former augmentation: RandomResizedCrop(0.5-1) + flip + RandAugment, teacher on that image).

    pytest bench/bench_epoch.py --benchmark-only [--benchmark-json epoch.json]

The former demo's setting (16 synthetic classes, base-to-novel, 8 shots, batch 4 -> 64
images / 16 steps per epoch on the 32-px tiny 12-layer CLIP; the demo now runs a 224-px
toy, docs/demo.md). The tiny CLIP's weights do not change the cost of a step, so no
pre-training is done. One torch thread (what the demo uses) unless
DROPLE_BENCH_THREADS says otherwise.
"""
import os

import pytest
import torch

from drople_fast.training.data import write_synthetic_coop_dataset
from drople_fast.training.trainer import (TrainConfig, build_clip, build_teacher_cache, build_training, make_plan,
                                          seed_everything, train_one_epoch)

MODES = ["off", "perturb", "drop", "drop-nocache", "drop-former"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo-data"))
    write_synthetic_coop_dataset(root, num_classes=16, images_per_class=40, seed=0)
    return root


@pytest.mark.parametrize("mode", MODES)
def test_epoch_time(benchmark, demo_root, tmp_path, mode):
    mode, _, variant = mode.partition("-")
    augment = {"augment": "randaugment", "crop_scale_min": 0.5} if variant == "former" else {}
    threads = int(os.environ.get("DROPLE_BENCH_THREADS", "1"))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = TrainConfig(dataset="Synthetic", root=demo_root, protocol="base2novel", shots=8, seed=1, epochs=5,
                          batch_size=4, iwtd={"mode": mode}, teacher_cache=variant == "", **augment,
                          output_dir=str(tmp_path / "unused"), fewshot_cache=str(tmp_path / "cache"),
                          progress=False)
        plan = make_plan(cfg)
        clip = build_clip(cfg.model, None)
        seed_everything(cfg.seed)
        setup = build_training(cfg, plan, clip, torch.device("cpu"))
        cache = build_teacher_cache(cfg, plan, setup, torch.device("cpu")) if cfg.teacher_cache and not augment else None
        setup.learner.train()
        state = {"epoch": 0}

        def one_epoch():
            _, batches, images = train_one_epoch(setup.learner, setup.loader, setup.optimizer, setup.scheduler,
                                                 torch.device("cpu"), "fp32", state["epoch"] % cfg.epochs,
                                                 cfg.epochs, teacher_cache=cache)
            state["epoch"] += 1
            return images

        images = benchmark.pedantic(one_epoch, rounds=3, warmup_rounds=1, iterations=1)
        benchmark.extra_info.update({"mode": mode, "variant": variant, "teacher_cache": cache is not None,
                                     "images_per_epoch": images, "threads": threads,
                                     "steps_per_epoch": len(setup.loader)})
        assert images == 64
    finally:
        torch.set_num_threads(old)
