"""Everything the project knows per dataset name: where its files are, which reader reads it, its
aliases, the teacher's CoOp template and the transfer protocols' target lists; and a user's own
dataset in the CoOp layout (:class:`CustomDataset`), known by name while :func:`custom_dataset` holds it."""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from .datasets import DatasetSplits, load_split_json_dataset, read_fgvc_aircraft, read_split_json, require_dir
from .imagenet import read_imagenet, read_imagenet_a, read_imagenet_r, read_imagenet_sketch, read_imagenet_v2

# name -> (dataset_dir, image_dir or "" for the dataset folder, split json)
SPLIT_JSON_DATASETS: Dict[str, Tuple[str, str, str]] = {
    "Caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "OxfordPets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "StanfordCars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "Flowers102": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "Food101": ("food-101", "images", "split_zhou_Food101.json"),
    "SUN397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "DTD": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "EuroSAT": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "UCF101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    # written by drople_fast.training.data.synthetic.write_synthetic_coop_dataset(root)
    "Synthetic": ("synthetic", "images", "split_zhou_Synthetic.json"),
}

OTHER_READERS: Dict[str, Callable[[str], DatasetSplits]] = {
    "ImageNet": read_imagenet,
    "FGVCAircraft": read_fgvc_aircraft,
    "ImageNetV2": read_imagenet_v2,
    "ImageNetSketch": read_imagenet_sketch,
    "ImageNetA": read_imagenet_a,
    "ImageNetR": read_imagenet_r,
}

# CoOp's per-dataset class template (the teacher's first template; CoOp's datasets/*.py).
DATASET_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "Flowers102": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DTD": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}

# The paper's transfer protocols: train on ImageNet, evaluate on these (cross-dataset / domain generalisation).
CROSS_DATASET_TARGETS = ("Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "Food101", "FGVCAircraft",
                         "SUN397", "DTD", "EuroSAT", "UCF101")
DG_TARGETS = ("ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")

# Extra spellings (CoOp class names, folder names) -> canonical name.
_ALIASES = {
    "oxfordflowers": "Flowers102",
    "flowers": "Flowers102",
    "describabletextures": "DTD",
    "fgvc": "FGVCAircraft",
    "aircraft": "FGVCAircraft",
    "caltech": "Caltech101",
}


DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class CustomDataset:
    """A user's dataset in the CoOp layout: ``folder`` holds the split file (``{"train"|"val"|"test":
    [[relpath, label, classname], ...]}``) and the images; class names come from the split.
    ``image_dir``: the folder the split's paths are relative to, inside ``folder`` (None: ``images/``
    when the split's first image is there, else ``folder`` itself). ``template``: the teacher's first
    template (None: :data:`DEFAULT_TEMPLATE`; a known dataset's template never applies)."""

    name: str
    folder: str
    split_file: str
    image_dir: Optional[str] = None
    template: Optional[str] = None


def split_file_name(path: str) -> str:
    """The dataset name a split file gives: ``split_zhou_MyFruits.json`` -> ``MyFruits``; else the stem."""
    stem = os.path.splitext(os.path.basename(path))[0]
    m = re.fullmatch(r"split_zhou_(.+)", stem)
    return m.group(1) if m else stem


def find_split_file(folder: str) -> str:
    """The one ``split_zhou_*.json`` in ``folder`` (its name); none or several is an error naming them."""
    require_dir(folder, "dataset folder")
    found = sorted(n for n in os.listdir(folder) if n.startswith("split_zhou_") and n.endswith(".json"))
    if len(found) != 1:
        what = "no split_zhou_*.json" if not found else f"{len(found)} split files ({', '.join(found)})"
        raise FileNotFoundError(f"dataset folder {folder} holds {what}; pass --split-file to name one")
    return found[0]


def _guess_image_dir(folder: str, split_path: str) -> str:
    """``images`` when ``folder/images`` exists and holds the split's first image (or neither place
    does: the missing-image check then names it there), else "" (paths relative to ``folder``)."""
    images = os.path.join(folder, "images")
    if not os.path.isdir(images):
        return ""
    first = next((recs[0] for recs in read_split_json(split_path, images).values() if recs), None)
    if first is None or os.path.isfile(first.path):
        return "images"
    return "" if os.path.isfile(os.path.join(folder, os.path.relpath(first.path, images))) else "images"


def read_custom(spec: CustomDataset) -> DatasetSplits:
    """Read ``spec`` with the checks every split-file dataset gets: the split's entries, labels 0..K-1
    matching the names, no image listed twice, every image present (the trainer also checks that the
    run's images decode: :func:`drople_fast.training.build.check_plan_images`)."""
    split_path = os.path.join(spec.folder, spec.split_file)
    if not os.path.isfile(split_path):
        raise FileNotFoundError(f"split file not found: {split_path}")
    image_dir = spec.image_dir if spec.image_dir is not None else _guess_image_dir(spec.folder, split_path)
    return load_split_json_dataset(spec.folder, spec.split_file, image_dir or None, name=spec.name)


_ACTIVE: List[CustomDataset] = []  # the innermost custom_dataset() scope last


@contextlib.contextmanager
def custom_dataset(spec: Optional[CustomDataset]) -> Iterator[None]:
    """Within this scope ``spec.name`` names ``spec`` (before, and instead of, a known dataset of that
    name) for :func:`canonical_name` and :func:`get_dataset`. None: a scope that changes nothing."""
    if spec is None:
        yield
        return
    _ACTIVE.append(spec)
    try:
        yield
    finally:
        _ACTIVE.remove(spec)


def _active(name: str) -> Optional[CustomDataset]:
    return next((spec for spec in reversed(_ACTIVE) if spec.name == name), None)


def template_of(name: str) -> str:
    """The teacher's first template for ``name``: a custom dataset's, or the known dataset's CoOp one."""
    spec = _active(name)
    if spec is not None:
        return spec.template or DEFAULT_TEMPLATE
    return DATASET_TEMPLATES.get(name, DEFAULT_TEMPLATE)


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def dataset_names() -> List[str]:
    return list(SPLIT_JSON_DATASETS) + list(OTHER_READERS)


def canonical_name(name: str) -> str:
    """Case/punctuation-insensitive lookup: "oxford_pets", "OxfordPets" -> "OxfordPets"; the name of an
    active :func:`custom_dataset` is itself."""
    if _active(name) is not None:
        return name
    key = _norm(name)
    table = {_norm(n): n for n in dataset_names()}
    for canonical, (dataset_dir, _, _) in SPLIT_JSON_DATASETS.items():
        table.setdefault(_norm(dataset_dir), canonical)
    table.update({"imagenetsketch": "ImageNetSketch", "imagenetadversarial": "ImageNetA", "imagenetrendition": "ImageNetR"})
    table.update(_ALIASES)
    if key not in table:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}; for a "
                         "dataset of your own in the CoOp layout pass --dataset-dir DIR (or --split-file)")
    return table[key]


def get_dataset(name: str, root: str, check_images: bool = True) -> DatasetSplits:
    """Read dataset ``name`` from the CoOp-layout dataset root ``root`` (an active
    :func:`custom_dataset` of that name from its own folder)."""
    spec = _active(name)
    if spec is not None:
        return read_custom(spec)
    canonical = canonical_name(name)
    require_dir(root, "dataset root")
    if canonical in SPLIT_JSON_DATASETS:
        dataset_dir, image_dir, split_file = SPLIT_JSON_DATASETS[canonical]
        return load_split_json_dataset(
            os.path.join(root, dataset_dir), split_file, image_dir or None, name=canonical, check_images=check_images
        )
    if canonical == "FGVCAircraft":
        return read_fgvc_aircraft(root, check_images=check_images)
    return OTHER_READERS[canonical](root)
