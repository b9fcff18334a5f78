"""The teacher's clean image (release/data/meta_dataset.py, release/models/drople.py) and the teacher
image-feature cache (drople_fast/training/teacher_cache.py).

The release is never imported; the behaviour it pins is described next to each test with its file:line.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from drople_fast.training import teacher_cache as tc
from drople_fast.training.data import eval_transform, load_image, train_views
from drople_fast.training.data import patch_augment as pa
from drople_fast.training.data.transforms import normalize_uint8, resize_center_crop
from drople_fast.training.data import write_synthetic_coop_dataset
from drople_fast.training.learner import DroPLe
from drople_fast.training.trainer import (CHECKPOINT, TrainConfig, build_clip, build_training, load_checkpoint,
                                          make_plan, train, train_one_epoch, build_teacher_cache)
from run_config import tiny_run_config

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_synthetic_coop_dataset(str(root), num_classes=4, images_per_class=8, image_size=40, seed=0)
    return str(root)


def config(root, out, **kw):
    return tiny_run_config(root, out, **{"shots": 4, "epochs": 2, "iwtd": {"mode": "drop"}, **kw})


class CountTeacher:
    """Counts the images that go through the teacher's image forward and keeps them."""

    def __init__(self, monkeypatch):
        self.images, self.calls = [], 0
        original = DroPLe.teacher_image_features

        def counted(learner, images):
            self.calls += 1
            self.images.append(images.detach().clone())
            return original(learner, images)

        monkeypatch.setattr(DroPLe, "teacher_image_features", counted)

    @property
    def count(self):
        return sum(x.shape[0] for x in self.images)


def setup_for(cfg):
    torch.manual_seed(cfg.seed)
    plan = make_plan(cfg)
    clip = build_clip(cfg.model)
    return plan, build_training(cfg, plan, clip, torch.device("cpu"))


# --------------------------------------------------------------------------
# the release's recipe
# --------------------------------------------------------------------------


def test_release_augmentation_is_the_default():
    # release/scripts/launch/launch.sh:68 passes configs/patch_aug.json (patch augmentation on)
    cfg = TrainConfig()
    assert cfg.augment == "patch" and cfg.teacher_cache


def test_views_are_resize_center_crop_and_teacher_gets_the_clean_image(data_root):
    # release/data/meta_dataset.py:70-92: the train transforms are Resize(224, bicubic) + CenterCrop(224)
    # (no random crop, no flip), the patch augmentation on top for the second one; :201-208 returns
    # [clean, augmented]; release/models/drople.py:825,848-851,869 gives the clean one (img) to the frozen
    # CLIP and the augmented one (img2) to the student. The clean view is the evaluation transform
    # (release/data/meta_dataset.py:95-101 is the same pipeline).
    from drople_fast.training.data import get_dataset

    path = get_dataset("Synthetic", data_root).train[0].path
    pil = load_image(path)
    views = train_views("patch", 32)
    torch.manual_seed(3)
    student, clean = views(pil)
    assert torch.equal(clean, eval_transform(32)(pil))
    torch.manual_seed(3)
    raw = torch.from_numpy(__import__("numpy").array(resize_center_crop(32)(pil))).permute(2, 0, 1).contiguous()
    assert torch.equal(student, normalize_uint8(pa.PatchRandAugment()(raw)))
    assert not torch.equal(student, clean)
    # no randomness in the geometry: the clean view never changes
    assert torch.equal(views(pil)[1], clean)


def test_training_items_are_student_teacher_label_index(data_root, tmp_path):
    # release/data/meta_dataset.py:201-208 returns [img_1 (clean), img_2 (augmented), label]; ours adds the
    # record's index, the teacher cache's key
    cfg = config(data_root, tmp_path / "run")
    plan, setup = setup_for(cfg)
    clean = eval_transform(setup.image_size)
    student, teacher, label, index = setup.loader.dataset[5]
    assert index == 5 and label == plan.train_records[5].label
    assert torch.equal(teacher, clean(load_image(plan.train_records[5].path)))
    assert student.shape == teacher.shape and not torch.equal(student, teacher)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_reproducible_from_its_seed(data_root, tmp_path, workers):
    # the patch augmentation draws from torch's RNG, seeded per worker from the loader's generator
    def first_batches(seed):
        cfg = config(data_root, tmp_path / f"run{seed}", seed=seed, num_workers=workers)
        _, setup = setup_for(cfg)
        return [b[0] for b in setup.loader]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_ddp_chunks_cover_every_record_once():
    # each rank computes every world-th chunk of the training batch size; together they cover the list
    for n, chunk, world in [(8, 2, 2), (9, 2, 2), (7, 3, 4), (2, 2, 3)]:
        got = sorted(i for r in range(world) for c in tc._chunks(n, chunk, world, r) for i in c)
        assert got == list(range(n))
        assert all(len(c) == chunk for r in range(world) for c in tc._chunks(n, chunk, world, r)[:-1])


def test_train_loop_feeds_the_teacher_the_clean_image(data_root, tmp_path, monkeypatch):
    cfg = config(data_root, tmp_path / "run", teacher_cache=False)
    plan, setup = setup_for(cfg)
    counter = CountTeacher(monkeypatch)
    order = []

    class Recording:  # the loader, remembering which records each batch holds
        def __len__(self):
            return len(setup.loader)

        def __iter__(self):
            for batch in setup.loader:
                order.append(batch[3].clone())  # (student, teacher, label, index)
                yield batch

    loader = Recording()
    train_one_epoch(setup.learner, loader, setup.optimizer, setup.scheduler, torch.device("cpu"), "fp32", 0, 1)
    clean = eval_transform(setup.image_size)
    assert len(counter.images) == len(order) > 0
    for seen, idx in zip(counter.images, order):
        want = torch.stack([clean(load_image(plan.train_records[i].path)) for i in idx.tolist()])
        assert torch.equal(seen, want)


def test_former_augmentation_still_gives_the_teacher_the_student_image(data_root, tmp_path, monkeypatch):
    cfg = config(data_root, tmp_path / "run", augment="randaugment", crop_scale_min=0.5)
    plan, setup = setup_for(cfg)
    student, teacher, _, _ = next(iter(setup.loader))
    assert setup.teacher_cache is None and torch.equal(student, teacher)
    with pytest.raises(ValueError, match="crop_scale_min only applies"):
        config(data_root, tmp_path / "x", crop_scale_min=0.5)
    with pytest.raises(ValueError, match="augment must be one of"):
        config(data_root, tmp_path / "x", augment="cutmix")


# --------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------


def test_cache_runs_the_teacher_once_per_image(data_root, tmp_path, monkeypatch):
    cfg = config(data_root, tmp_path / "run")
    plan, setup = setup_for(cfg)
    counter = CountTeacher(monkeypatch)
    cache = build_teacher_cache(cfg, plan, setup, torch.device("cpu"))
    n = len(plan.train_records)
    assert counter.count == n  # computed once, in batches of the training batch size
    assert all(x.shape[0] == cfg.batch_size for x in counter.images)
    for epoch in range(2):
        before = counter.count
        train_one_epoch(setup.learner, setup.loader, setup.optimizer, setup.scheduler, torch.device("cpu"), "fp32",
                        epoch, 2, teacher_cache=cache)
        assert counter.count == before  # epochs 1 and 2: every lookup is a hit
    # without the cache: every step runs the teacher on its batch
    cfg2 = config(data_root, tmp_path / "run2", teacher_cache=False)
    plan2, setup2 = setup_for(cfg2)
    counter2 = CountTeacher(monkeypatch)
    train_one_epoch(setup2.learner, setup2.loader, setup2.optimizer, setup2.scheduler, torch.device("cpu"), "fp32",
                    0, 1)
    assert counter2.count == len(setup2.loader) * cfg.batch_size


def test_cached_features_are_the_teachers_on_the_clean_image(data_root, tmp_path):
    cfg = config(data_root, tmp_path / "run", batch_size=3)  # 8 images: the last chunk is padded
    plan, setup = setup_for(cfg)
    cache = build_teacher_cache(cfg, plan, setup, torch.device("cpu"))
    clean = eval_transform(setup.image_size)
    imgs = torch.stack([clean(load_image(r.path)) for r in plan.train_records])
    for start in range(0, len(imgs) - 2, 3):  # full training-size batches: bitwise
        assert torch.equal(cache[torch.arange(start, start + 3)],
                           setup.learner.teacher_image_features(imgs[start:start + 3]))
    assert torch.allclose(cache.features, setup.learner.teacher_image_features(imgs), atol=1e-6)


def test_cache_keeps_float32_features_computed_under_the_steps_autocast(data_root, tmp_path):
    # the cache is built under the training step's autocast (here bf16 on the CPU) and stores the float32
    # unit vectors the teacher returns inside such a step; the fp32 features differ
    cfg = config(data_root, tmp_path / "run")
    plan, setup = setup_for(cfg)
    paths = [r.path for r in plan.train_records]
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    cache = tc.build_teacher_cache(setup.learner, paths, setup.image_size, torch.device("cpu"), 2, bf16)
    fp32 = tc.build_teacher_cache(setup.learner, paths, setup.image_size, torch.device("cpu"), 2,
                                  lambda: torch.autocast("cpu", enabled=False))
    clean = eval_transform(setup.image_size)
    imgs = torch.stack([clean(load_image(p)) for p in paths[:2]])
    with bf16():
        in_step = setup.learner.teacher_image_features(imgs)
    assert cache.features.dtype == torch.float32 and torch.equal(cache[torch.arange(2)], in_step)
    assert cache.key != fp32.key and not torch.equal(cache.features, fp32.features)


def _key(clip, paths, size=32, chunk=2):
    return tc.cache_key(clip, paths, size, torch.device("cpu"), chunk)


def test_key_changes_with_weights_preprocessing_images_and_compute(data_root, tmp_path):
    from drople_fast.training.data import get_dataset

    paths = [r.path for r in get_dataset("Synthetic", data_root).train[:4]]
    clip = build_clip("tiny")
    key = _key(clip, paths)
    assert key == _key(build_clip("tiny"), paths)  # same weights, same key
    with torch.no_grad():
        w = clip.visual.conv1.weight
        w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(1.0))  # one ulp
    assert _key(clip, paths) != key
    clip = build_clip("tiny")
    assert _key(clip, paths, size=28) != key
    assert _key(clip, paths, chunk=4) != key
    assert _key(clip, paths[::-1]) != key
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _key(clip, paths) != key
    # an image rewritten in place (same path, new mtime)
    copy = tmp_path / "img.png"
    copy.write_bytes(open(paths[0], "rb").read())
    k1 = _key(clip, [str(copy)] + paths[1:])
    st = os.stat(copy)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert _key(clip, [str(copy)] + paths[1:]) != k1
    # the text tower is not the teacher's image path: changing it keeps the key
    with torch.no_grad():
        clip.token_embedding.weight.add_(1.0)
    assert _key(clip, paths) == key


def test_file_cache_hit_invalidated_and_corruption_detected(data_root, tmp_path, monkeypatch, capsys):
    cfg = config(data_root, tmp_path / "run")
    plan, setup = setup_for(cfg)
    first = build_teacher_cache(cfg, plan, setup, torch.device("cpu"))
    folder = os.path.join(str(tmp_path / "run") + "-cache", tc.FOLDER)
    files = os.listdir(folder)
    assert len(files) == 1 and first.source == "computed"
    path = os.path.join(folder, files[0])

    counter = CountTeacher(monkeypatch)
    again = build_teacher_cache(cfg, plan, setup, torch.device("cpu"))  # e.g. a resumed run
    assert counter.count == 0 and again.source == path and torch.equal(again.features, first.features)

    # damaged bytes: does not load -> reported, recomputed (same values), file replaced
    blob = bytearray(open(path, "rb").read())
    open(path, "wb").write(bytes(blob[: len(blob) // 2]))
    fixed = build_teacher_cache(cfg, plan, setup, torch.device("cpu"))
    assert "does not load" in capsys.readouterr().err
    assert counter.count == len(plan.train_records) and torch.equal(fixed.features, first.features)
    assert torch.equal(tc._read(path, first.key, len(first)), first.features)

    # loads, but a feature changed: the checksum catches it
    payload = torch.load(path, weights_only=True)
    payload["features"][0, 0] += 1
    torch.save(payload, path)
    build_teacher_cache(cfg, plan, setup, torch.device("cpu"))
    assert "fails its checksum" in capsys.readouterr().err

    # other weights: a new file under a new key; the old one is never served for them
    with torch.no_grad():
        setup.learner.clip.visual.proj.add_(0.01)
    changed = build_teacher_cache(cfg, plan, setup, torch.device("cpu"))
    assert changed.key != first.key and changed.source == "computed"
    assert not torch.equal(changed.features, first.features)
    assert len(os.listdir(folder)) == 2


@pytest.mark.parametrize("batch_size", [2, 3])  # 3: 8 images, the cache's last chunk is padded
def test_same_training_result_with_and_without_cache(data_root, tmp_path, batch_size):
    # tiny config, CPU fp32, IWTD drop mode: final learner tensors and losses bitwise equal
    runs = {}
    for cached in (True, False):
        out = tmp_path / f"run-{cached}"
        metrics = train(config(data_root, out, teacher_cache=cached, batch_size=batch_size))
        runs[cached] = (load_checkpoint(str(out / CHECKPOINT)), metrics)
    (a, ma), (b, mb) = runs[True], runs[False]
    assert a["learner"].keys() == b["learner"].keys()
    for k in a["learner"]:
        assert torch.equal(a["learner"][k], b["learner"][k]), k
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert ma["base_acc"] == mb["base_acc"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_same_result_with_and_without_cache(data_root, tmp_path):
    # each rank computes half of the chunks, an all-gather gives both the whole table (the sampler deals
    # the images out anew every epoch), rank 0 writes the file; each rank looks up its batches by index
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT_DIR)
    ckpts = {}
    for flag in ([], ["--no-teacher-cache"]):
        out = tmp_path / ("ddp" + "".join(flag))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "drople_fast", "train",
               "--dataset", "Synthetic", "--root", data_root, "--shots", "4", "--epochs", "2", "--batch-size", "2",
               "--device", "cpu", "--output-dir", str(out), "--no-progress", "--threads", "1", *flag]
        res = subprocess.run(cmd, cwd=ROOT_DIR, env=env, capture_output=True, timeout=300)
        assert res.returncode == 0, res.stderr.decode()[-3000:]
        ckpts[bool(flag)] = load_checkpoint(str(out / CHECKPOINT))
    assert os.listdir(os.path.join(data_root, "split_fewshot", tc.FOLDER))  # <root>/split_fewshot: the default
    for k in ckpts[False]["learner"]:
        assert torch.equal(ckpts[False]["learner"][k], ckpts[True]["learner"][k]), k


def test_cli_options(tmp_path):
    from drople_fast.training import cli

    base = ["train", "--dataset", "Synthetic", "--root", str(tmp_path), "--output-dir", str(tmp_path / "o")]
    args = cli.build_parser().parse_args(base)
    cfg = cli._config(args, args.dataset, args.seed, args.output_dir, False)
    assert cfg.augment == "patch" and cfg.teacher_cache
    args = cli.build_parser().parse_args(base + ["--augment", "crop_flip", "--no-teacher-cache"])
    cfg = cli._config(args, args.dataset, args.seed, args.output_dir, False)
    assert cfg.augment == "crop_flip" and not cfg.teacher_cache
