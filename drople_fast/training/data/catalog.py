"""Everything the project knows per dataset name: where its files are, which reader reads it, its
aliases, the teacher's CoOp template and the transfer protocols' target lists."""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Tuple

from .datasets import DatasetSplits, require_dir, load_split_json_dataset, read_fgvc_aircraft
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


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def dataset_names() -> List[str]:
    return list(SPLIT_JSON_DATASETS) + list(OTHER_READERS)


def canonical_name(name: str) -> str:
    """Case/punctuation-insensitive lookup: "oxford_pets", "OxfordPets" -> "OxfordPets"."""
    key = _norm(name)
    table = {_norm(n): n for n in dataset_names()}
    for canonical, (dataset_dir, _, _) in SPLIT_JSON_DATASETS.items():
        table.setdefault(_norm(dataset_dir), canonical)
    table.update({"imagenetsketch": "ImageNetSketch", "imagenetadversarial": "ImageNetA", "imagenetrendition": "ImageNetR"})
    table.update(_ALIASES)
    if key not in table:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}")
    return table[key]


def get_dataset(name: str, root: str, check_images: bool = True) -> DatasetSplits:
    """Read dataset ``name`` from the CoOp-layout dataset root ``root``."""
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
