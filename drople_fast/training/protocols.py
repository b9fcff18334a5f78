"""Evaluation protocols (docs/design.md §9): which records train, which splits are evaluated.

Each protocol function returns a :class:`Plan`: the training classes and
(few-shot, seeded, disk-cached) records, and a list of named evaluation
splits. Evaluation splits are always a dataset's *test* split; nothing here
offers a test split for model selection; the trainer reports the last epoch.

Metric names (keys of ``metrics.json``, see :mod:`drople_fast.training.report`):

* ``base2novel``: ``base_acc``, ``novel_acc``, ``hm``
* ``cross_dataset`` / ``dg``: ``acc`` (source test) and ``acc_<Target>``
* ``few_shot`` / ``long_tail``: ``acc``
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from .data import (CROSS_DATASET_TARGETS, DG_TARGETS, DatasetSplits, Record, canonical_name, few_shot_split, get_dataset, long_tail_subsample,
                   subsample_classes)

FEW_SHOT_SHOTS = (1, 2, 4, 8, 16)


@dataclass
class EvalSplit:
    """One evaluation: records of a test split and the class list the classifier uses."""

    name: str  # metric key, e.g. "base_acc", "acc", "acc_ImageNetV2"
    dataset: str
    classnames: List[str]
    records: List[Record]


@dataclass
class Plan:
    protocol: str
    dataset: str
    train_classnames: List[str]
    train_records: List[Record]
    evals: List[EvalSplit] = field(default_factory=list)
    info: Dict = field(default_factory=dict)


def _check_nonempty(records: Sequence[Record], what: str) -> None:
    if not records:
        raise ValueError(f"{what} is empty")


def _check_every_class(records: Sequence[Record], classnames: Sequence[str], what: str) -> None:
    """A class without a training image would train with 0 shots, silently: refuse, naming it."""
    seen = {r.label for r in records}
    empty = [f"{i} ({name})" for i, name in enumerate(classnames) if i not in seen]
    if empty:
        raise ValueError(f"{what}: class(es) {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} "
                         "have no training image")


def _test(ds: DatasetSplits, key: str) -> EvalSplit:
    _check_nonempty(ds.test, f"test split of {ds.name}")
    return EvalSplit(key, ds.name, list(ds.classnames), list(ds.test))


def base_to_novel(dataset: str, root: str, shots: int = 16, seed: int = 1, cache_dir: Optional[str] = None,
                  allow_fewer: bool = False, **_) -> Plan:
    """Train on the base half of the classes (few-shot), test on base and on novel classes."""
    ds = get_dataset(dataset, root)
    base, novel = subsample_classes(ds, "base"), subsample_classes(ds, "novel")
    if not novel.classnames:
        raise ValueError(f"{ds.name} has {ds.num_classes} class(es): base-to-novel needs at least 2")
    train = few_shot_split(base, "train", shots, seed, cache_dir, allow_fewer)
    _check_nonempty(train, f"training split of {base.name}")
    _check_every_class(train, base.classnames, f"training split of {base.name}")
    return Plan("base2novel", ds.name, list(base.classnames), train,
                [_test(base, "base_acc"), _test(novel, "novel_acc")], {"shots": shots})


def _all_classes(protocol: str, source: str, root: str, shots: int, seed: int, cache_dir, targets,
                 allow_fewer: bool = False) -> Plan:
    ds = get_dataset(source, root)
    train = few_shot_split(ds, "train", shots, seed, cache_dir, allow_fewer)
    _check_nonempty(train, f"training split of {ds.name}")
    _check_every_class(train, ds.classnames, f"training split of {ds.name}")
    evals = [_test(ds, "acc")]
    for name in targets:
        target = get_dataset(name, root)
        evals.append(_test(target, f"acc_{target.name}"))
    return Plan(protocol, ds.name, list(ds.classnames), train, evals, {"shots": shots, "targets": list(targets)})


def cross_dataset(dataset: str = "ImageNet", root: str = ".", shots: int = 16, seed: int = 1,
                  cache_dir: Optional[str] = None, targets: Optional[Sequence[str]] = None, allow_fewer: bool = False,
                  **_) -> Plan:
    """Train on ``dataset`` (ImageNet) with all its classes; test every target on ALL its classes."""
    source = canonical_name(dataset)
    targets = [canonical_name(t) for t in (targets if targets is not None else CROSS_DATASET_TARGETS)]
    return _all_classes("cross_dataset", source, root, shots, seed, cache_dir, [t for t in targets if t != source],
                        allow_fewer)


def domain_generalization(dataset: str = "ImageNet", root: str = ".", shots: int = 16, seed: int = 1,
                          cache_dir: Optional[str] = None, targets: Optional[Sequence[str]] = None,
                          allow_fewer: bool = False, **_) -> Plan:
    """Train on ImageNet (all classes); test on ImageNet and its variants V2 / Sketch / A / R."""
    targets = [canonical_name(t) for t in (targets if targets is not None else DG_TARGETS)]
    return _all_classes("dg", canonical_name(dataset), root, shots, seed, cache_dir, targets, allow_fewer)


def few_shot(dataset: str, root: str, shots: int = 16, seed: int = 1, cache_dir: Optional[str] = None,
             allow_fewer: bool = False, **_) -> Plan:
    """All classes, ``shots`` (1/2/4/8/16) images per class; test on all classes."""
    if shots <= 0:
        raise ValueError(f"few-shot needs shots >= 1, got {shots}")
    ds = get_dataset(dataset, root)
    train = few_shot_split(ds, "train", shots, seed, cache_dir, allow_fewer)
    _check_every_class(train, ds.classnames, f"training split of {ds.name}")
    return Plan("few_shot", ds.name, list(ds.classnames), train, [_test(ds, "acc")], {"shots": shots})


def long_tail(dataset: str, root: str, shots: int = 0, seed: int = 1, cache_dir: Optional[str] = None,
              imbalance: float = 10.0, allow_fewer: bool = False, **_) -> Plan:
    """Long-tailed training set (class i keeps n_max·(1/imbalance)^(i/(C-1)) images; n_max =
    ``shots`` when > 0, else the full split); test on all classes."""
    ds = get_dataset(dataset, root)
    pool = few_shot_split(ds, "train", shots, seed, cache_dir, allow_fewer) if shots > 0 else list(ds.train)
    train = long_tail_subsample(pool, imbalance, seed)
    _check_nonempty(train, f"training split of {ds.name}")
    return Plan("long_tail", ds.name, list(ds.classnames), train, [_test(ds, "acc")],
                {"shots": shots, "imbalance": imbalance})


PROTOCOLS: Dict[str, Callable[..., Plan]] = {
    "base2novel": base_to_novel,
    "cross_dataset": cross_dataset,
    "dg": domain_generalization,
    "few_shot": few_shot,
    "long_tail": long_tail,
}
_ALIASES = {"base_to_novel": "base2novel", "b2n": "base2novel", "cross": "cross_dataset",
            "domain_generalization": "dg", "fewshot": "few_shot", "longtail": "long_tail"}


def canonical_protocol(name: str) -> str:
    key = name.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known protocols: {', '.join(PROTOCOLS)}")
    return key


def build_plan(protocol: str, dataset: str, root: str, shots: int, seed: int, cache_dir: Optional[str] = None,
               targets: Optional[Sequence[str]] = None, imbalance: float = 10.0, allow_fewer: bool = False) -> Plan:
    """Dispatch to the protocol function (names: :data:`PROTOCOLS` keys or their aliases). ``allow_fewer``:
    a class with fewer training images than ``shots`` keeps them all instead of failing."""
    fn = PROTOCOLS[canonical_protocol(protocol)]
    return fn(dataset=dataset, root=root, shots=shots, seed=seed, cache_dir=cache_dir, targets=targets,
              imbalance=imbalance, allow_fewer=allow_fewer)


def metrics_from_accuracies(plan: Plan, accs: Dict[str, float]) -> Dict[str, float]:
    """Add the derived metrics (``hm`` for base-to-novel) to the per-split accuracies."""
    out = dict(accs)
    if plan.protocol == "base2novel":
        from .report import harmonic_mean

        out["hm"] = harmonic_mean(out["base_acc"], out["novel_acc"])
    return out
