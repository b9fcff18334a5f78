"""Seeded few-shot sampling (cached on disk), base/novel class splits and
long-tail subsampling.

Every random choice uses its own ``random.Random(seed)`` over records sorted
by (label, path), never a global RNG, so seed s picks the same images on any
machine (all records of a dataset share the image folder prefix, so sorting
absolute paths equals sorting the relative ones). The release's unseeded
sampling is a fault not to copy (docs/design.md §9).
"""
from __future__ import annotations

import math
import os
import random
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

from ..fileio import atomic_json, read_json_object
from .datasets import SPLITS, DatasetSplits, Record


def _by_class(records: Sequence[Record]) -> Dict[int, List[Record]]:
    groups: Dict[int, List[Record]] = defaultdict(list)
    for r in records:
        groups[r.label].append(r)
    return {y: sorted(groups[y], key=lambda r: r.path) for y in sorted(groups)}


def sample_few_shot(
    records: Sequence[Record], shots: int, seed: int, allow_fewer: bool = False
) -> List[Record]:
    """``shots`` records per class, chosen by ``random.Random(seed)``.

    A class with fewer than ``shots`` records raises ValueError unless
    ``allow_fewer``, which then keeps all of that class's records.
    ``shots <= 0`` means "all records" (CoOp's convention for full data).
    """
    if shots <= 0:
        return sorted(records, key=lambda r: (r.label, r.path))
    rng = random.Random(seed)
    out: List[Record] = []
    for label, items in _by_class(records).items():
        if len(items) < shots:
            if not allow_fewer:
                raise ValueError(
                    f"class {label} ({items[0].classname!r}) has {len(items)} images, "
                    f"fewer than the {shots} shots asked for (pass --allow-fewer, allow_fewer=True in Python, to keep "
                    f"all {len(items)}, or lower --shots)"
                )
            out.extend(items)
        else:
            out.extend(rng.sample(items, shots))
    return out


def _relpath(path: str, image_dir: str) -> str:
    return os.path.relpath(path, image_dir).replace(os.sep, "/")


def few_shot_split(
    dataset: DatasetSplits,
    split: str,
    shots: int,
    seed: int,
    cache_dir: Optional[str] = None,
    allow_fewer: bool = False,
) -> List[Record]:
    """Few-shot subset of one split of ``dataset``, cached as JSON.

    The cache file is ``<cache_dir>/<dataset.name>/<split>_shots<k>_seed<s>.json``
    with paths relative to ``dataset.image_dir``; a later call (any process,
    any machine) reads it back instead of sampling again. A cache whose
    entries are not in the current split raises ValueError naming the file.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    records = dataset.split(split)
    if cache_dir is None:
        return sample_few_shot(records, shots, seed, allow_fewer)

    path = os.path.join(cache_dir, dataset.name, f"{split}_shots{shots}_seed{seed}.json")
    if os.path.isfile(path):
        return _read_cache(path, dataset, records)
    chosen = sample_few_shot(records, shots, seed, allow_fewer)
    payload = {
        "dataset": dataset.name,
        "split": split,
        "shots": shots,
        "seed": seed,
        "items": [[_relpath(r.path, dataset.image_dir), r.label, r.classname] for r in chosen],
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_json(path, payload)  # atomic, so concurrent runs never read half a file
    return chosen


def _read_cache(path: str, dataset: DatasetSplits, records: Sequence[Record]) -> List[Record]:
    items = read_json_object(path, "few-shot cache").get("items")
    if not isinstance(items, list):
        raise ValueError(f"few-shot cache {path} is not valid: no list of items")
    index = {(_relpath(r.path, dataset.image_dir), r.label, r.classname): r for r in records}
    out = []
    for item in items:
        key = tuple(item) if isinstance(item, list) and len(item) == 3 else None
        if key not in index:
            raise ValueError(
                f"few-shot cache {path} is stale: {item!r} is not in the current split; delete the file to resample"
            )
        out.append(index[key])
    return out


# --------------------------------------------------------------------------
# base / novel

def base_novel_labels(labels: Sequence[int]) -> Tuple[List[int], List[int]]:
    """CoOp's ``subsample_classes``: sorted labels, first ceil(n/2) are base."""
    labels = sorted(set(labels))
    m = math.ceil(len(labels) / 2)
    return labels[:m], labels[m:]


def subsample_classes(dataset: DatasetSplits, subset: str) -> DatasetSplits:
    """Keep the "all", "base" or "novel" classes of every split, relabelled 0..k-1.

    The split is over all of the dataset's labels (0..K-1), as CoOp's
    ``subsample_classes`` over train+val+test. "new" is accepted for "novel".
    """
    subset = {"new": "novel"}.get(subset, subset)
    if subset == "all":
        return dataset
    if subset not in ("base", "novel"):
        raise ValueError(f"unknown class subset {subset!r}; expected 'all', 'base' or 'novel'")
    base, novel = base_novel_labels(range(dataset.num_classes))
    selected = base if subset == "base" else novel
    relabel = {y: i for i, y in enumerate(selected)}

    def keep(records: List[Record]) -> List[Record]:
        return [Record(r.path, relabel[r.label], r.classname) for r in records if r.label in relabel]

    return DatasetSplits(
        name=f"{dataset.name}-{subset}",
        classnames=[dataset.classnames[y] for y in selected],
        train=keep(dataset.train),
        val=keep(dataset.val),
        test=keep(dataset.test),
        image_dir=dataset.image_dir,
    )


# --------------------------------------------------------------------------
# long tail

def long_tail_counts(n_max: int, num_classes: int, imbalance: float = 10.0) -> List[int]:
    """Class i keeps floor(n_max * (1/imbalance)^(i/(C-1))), at least 1."""
    if imbalance < 1:
        raise ValueError(f"imbalance factor must be >= 1, got {imbalance}")
    if num_classes == 1:
        return [n_max]
    return [
        max(1, int(n_max * (1.0 / imbalance) ** (i / (num_classes - 1))))
        for i in range(num_classes)
    ]


def long_tail_subsample(records: Sequence[Record], imbalance: float = 10.0, seed: int = 0) -> List[Record]:
    """Long-tailed subset: classes in label order get :func:`long_tail_counts`
    with ``n_max`` = the largest class size; a class smaller than its target
    keeps everything it has. Which images are kept is drawn by ``Random(seed)``."""
    groups = _by_class(records)
    if not groups:
        return []
    counts = long_tail_counts(max(len(v) for v in groups.values()), len(groups), imbalance)
    rng = random.Random(seed)
    out: List[Record] = []
    for (label, items), target in zip(groups.items(), counts):
        out.extend(rng.sample(items, min(target, len(items))))
    return out
