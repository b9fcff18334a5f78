"""Seeded few-shot sampling, its disk cache, base/novel split, long tail."""
import json
import math
import os
import subprocess
import sys

import pytest

from drople_fast.training.data import (
    DatasetSplits,
    Record,
    base_novel_labels,
    few_shot_split,
    long_tail_counts,
    long_tail_subsample,
    sample_few_shot,
    subsample_classes,
)


def _dataset(root="/data/imgs", num_classes=5, per_class=20, name="toy"):
    records = [
        Record(f"{root}/c{y}/{i:03d}.jpg", y, f"class {y}") for y in range(num_classes) for i in range(per_class)
    ]
    return DatasetSplits(name, [f"class {y}" for y in range(num_classes)], train=records,
                         val=records[::4], test=records[::2], image_dir=root)


def test_few_shot_per_class_and_seeded():
    ds = _dataset()
    a = sample_few_shot(ds.train, 4, seed=1)
    assert len(a) == 20
    assert all(sum(r.label == y for r in a) == 4 for y in range(5))
    assert a == sample_few_shot(ds.train, 4, seed=1)
    assert a != sample_few_shot(ds.train, 4, seed=2)
    # input order does not matter: records are sorted before sampling
    assert a == sample_few_shot(list(reversed(ds.train)), 4, seed=1)


def test_few_shot_matches_reference_algorithm():
    """Pin the algorithm so seeds give the same shots across versions of this code."""
    import random

    ds = _dataset()
    rng = random.Random(3)
    expected = []
    for y in range(5):
        items = sorted((r for r in ds.train if r.label == y), key=lambda r: r.path)
        expected += rng.sample(items, 2)
    assert sample_few_shot(ds.train, 2, seed=3) == expected


def test_few_shot_does_not_touch_global_rng():
    import random

    random.seed(123)
    before = random.random()
    random.seed(123)
    sample_few_shot(_dataset().train, 4, seed=1)
    assert random.random() == before


def test_too_few_images():
    ds = _dataset(per_class=3)
    with pytest.raises(ValueError, match=r"class 0 \('class 0'\) has 3 images, fewer than the 16 shots"):
        sample_few_shot(ds.train, 16, seed=1)
    kept = sample_few_shot(ds.train, 16, seed=1, allow_fewer=True)
    assert len(kept) == 15


def test_cache_roundtrip_and_portability(tmp_path):
    cache = str(tmp_path / "cache")
    ds = _dataset(root="/machine_a/imgs")
    first = few_shot_split(ds, "train", 4, seed=1, cache_dir=cache)
    path = os.path.join(cache, "toy", "train_shots4_seed1.json")
    assert os.path.isfile(path)
    stored = json.load(open(path))
    assert stored["items"][0][0].startswith("c0/")  # relative paths
    # edit the cache: a cache hit must return the cached choice, not resample
    stored["items"][0] = ["c0/019.jpg", 0, "class 0"] if stored["items"][0][0] != "c0/019.jpg" else ["c0/018.jpg", 0, "class 0"]
    json.dump(stored, open(path, "w"))
    hit = few_shot_split(ds, "train", 4, seed=1, cache_dir=cache)
    assert hit[0].path == "/machine_a/imgs/" + stored["items"][0][0]
    assert hit[1:] == first[1:]
    # another machine: same relative shots under its own root
    ds_b = _dataset(root="/machine_b/data")
    on_b = few_shot_split(ds_b, "train", 4, seed=1, cache_dir=cache)
    assert [os.path.relpath(r.path, "/machine_b/data") for r in on_b] == [i[0] for i in stored["items"]]
    # without the cache both machines also agree (the sort key ignores the root)
    fresh_a = few_shot_split(_dataset(root="/x/y"), "val", 2, seed=2)
    fresh_b = few_shot_split(_dataset(root="/other"), "val", 2, seed=2)
    assert [os.path.relpath(r.path, "/x/y") for r in fresh_a] == [os.path.relpath(r.path, "/other") for r in fresh_b]


def test_stale_cache(tmp_path):
    cache = str(tmp_path)
    few_shot_split(_dataset(), "train", 2, seed=1, cache_dir=cache)
    smaller = _dataset(per_class=1)  # most cached images no longer exist
    with pytest.raises(ValueError, match="stale"):
        few_shot_split(smaller, "train", 2, seed=1, cache_dir=cache)
    with open(os.path.join(cache, "toy", "train_shots2_seed1.json"), "w") as f:
        f.write("{oops")
    with pytest.raises(ValueError, match="train_shots2_seed1.json is not valid"):
        few_shot_split(_dataset(), "train", 2, seed=1, cache_dir=cache)


# The child imports only drople_fast.training.data: a bare parent package stands in for
# drople_fast/__init__.py, whose kernel imports would dominate the run time.
SCRIPT = """
import json, sys, types
pkg = types.ModuleType("drople_fast")
pkg.__path__ = [{repo!r} + "/drople_fast"]
sys.modules["drople_fast"] = pkg
from drople_fast.training.data import DatasetSplits, Record, few_shot_split
recs = [Record(f"/d/c{{y}}/{{i:03d}}.jpg", y, f"class {{y}}") for y in range(5) for i in range(20)]
ds = DatasetSplits("toy", [f"class {{y}}" for y in range(5)], train=recs, image_dir="/d")
cache = sys.argv[1] if len(sys.argv) > 1 else None
print(json.dumps([r.path for r in few_shot_split(ds, "train", 3, seed=2, cache_dir=cache)]))
"""


@pytest.mark.slow
def test_same_shots_across_processes(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = SCRIPT.format(repo=repo)
    env = dict(os.environ, PYTHONHASHSEED="random")
    # process 1 samples fresh and writes the cache; process 2 samples fresh
    # without it; this process then reads process 1's cache.
    runs = [subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
            for args in ([str(tmp_path)], [])]
    outs = [json.loads(r.stdout) for r in runs]
    assert os.path.isfile(tmp_path / "toy" / "train_shots3_seed2.json")
    recs = [Record(f"/d/c{y}/{i:03d}.jpg", y, f"class {y}") for y in range(5) for i in range(20)]
    ds = DatasetSplits("toy", [f"class {y}" for y in range(5)], train=recs, image_dir="/d")
    hit = [r.path for r in few_shot_split(ds, "train", 3, seed=2, cache_dir=str(tmp_path))]
    assert outs[0] == outs[1] == hit
    assert len(hit) == 15


@pytest.mark.parametrize("n", [1, 2, 3, 10, 11, 37, 47, 100, 101, 102, 397, 1000])
def test_base_novel_boundaries(n):
    base, novel = base_novel_labels(list(range(n))[::-1])
    m = math.ceil(n / 2)
    assert base == list(range(m)) and novel == list(range(m, n))


def test_known_benchmark_split_sizes():
    # CoOp's base/novel class counts on the 11 datasets
    sizes = {1000: (500, 500), 100: (50, 50), 37: (19, 18), 196: (98, 98), 102: (51, 51), 101: (51, 50),
             397: (199, 198), 47: (24, 23), 10: (5, 5)}
    for n, (b, v) in sizes.items():
        base, novel = base_novel_labels(range(n))
        assert (len(base), len(novel)) == (b, v)


def test_subsample_classes_relabels():
    ds = _dataset(num_classes=5, per_class=2)
    base = subsample_classes(ds, "base")
    novel = subsample_classes(ds, "novel")
    assert base.classnames == ["class 0", "class 1", "class 2"]
    assert novel.classnames == ["class 3", "class 4"]
    assert sorted({r.label for r in novel.test}) == [0, 1]
    assert all(novel.classnames[r.label] == r.classname for r in novel.train + novel.val + novel.test)
    assert all(base.classnames[r.label] == r.classname for r in base.train)
    assert len(base.train) == 6 and len(novel.train) == 4
    assert subsample_classes(ds, "new").classnames == novel.classnames
    assert subsample_classes(ds, "all") is ds
    with pytest.raises(ValueError, match="'half'"):
        subsample_classes(ds, "half")


def test_long_tail_counts():
    counts = long_tail_counts(100, 5, imbalance=10)
    assert counts == [int(100 * 0.1 ** (i / 4)) for i in range(5)] == [100, 56, 31, 17, 10]
    assert long_tail_counts(16, 3, 10) == [16, 5, 1]
    assert long_tail_counts(7, 1) == [7]
    with pytest.raises(ValueError, match="imbalance"):
        long_tail_counts(10, 3, 0.5)


def test_long_tail_subsample():
    ds = _dataset(num_classes=5, per_class=100)
    lt = long_tail_subsample(ds.train, imbalance=10, seed=1)
    per_class = [sum(r.label == y for r in lt) for y in range(5)]
    assert per_class == [100, 56, 31, 17, 10]
    assert lt == long_tail_subsample(list(reversed(ds.train)), imbalance=10, seed=1)
    assert lt != long_tail_subsample(ds.train, imbalance=10, seed=2)
    assert set(lt) <= set(ds.train)
