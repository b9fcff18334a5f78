"""ImageNet and its test-only variants (V2, Sketch, A, R) in the CoOp layout (see :mod:`.datasets`)."""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from .datasets import DatasetSplits, Record, image_files, listdir_nohidden, require_dir, require_file


def read_wnid_classnames(path: str) -> Dict[str, str]:
    """``classnames.txt``: lines "<wnid> <class name>", kept in file order."""
    require_file(path, "class name file")
    out: Dict[str, str] = {}
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            wnid, _, name = line.partition(" ")
            if not name.strip():
                raise ValueError(f"{path}:{lineno}: expected '<wnid> <class name>', got {line!r}")
            if wnid in out:
                raise ValueError(f"{path}:{lineno}: duplicate wnid {wnid!r}")
            out[wnid] = name.strip()
    return out


def _read_wnid_folders(folder: str, wnid2name: Dict[str, str], source: str) -> Tuple[List[str], List[Record]]:
    """Sorted wnid folders -> labels 0..K-1 (CoOp), class names from ``wnid2name``."""
    wnids = [d for d in listdir_nohidden(folder) if os.path.isdir(os.path.join(folder, d))]
    if not wnids:
        raise FileNotFoundError(f"no class folders in {folder}")
    unknown = [w for w in wnids if w not in wnid2name]
    if unknown:
        raise ValueError(f"class folders {unknown[:5]} in {folder} are not listed in {source}")
    records = []
    for label, wnid in enumerate(wnids):
        class_dir = os.path.join(folder, wnid)
        for name in image_files(class_dir):
            records.append(Record(os.path.join(class_dir, name), label, wnid2name[wnid]))
    return [wnid2name[w] for w in wnids], records


def read_imagenet(root: str) -> DatasetSplits:
    dataset_dir = require_dir(os.path.join(root, "imagenet"), "dataset folder")
    image_dir = require_dir(os.path.join(dataset_dir, "images"), "image folder")
    source = os.path.join(dataset_dir, "classnames.txt")
    wnid2name = read_wnid_classnames(source)
    train_dir = require_dir(os.path.join(image_dir, "train"), "ImageNet train folder")
    val_dir = require_dir(os.path.join(image_dir, "val"), "ImageNet val folder")
    classnames, train = _read_wnid_folders(train_dir, wnid2name, source)
    test_classnames, test = _read_wnid_folders(val_dir, wnid2name, source)
    if test_classnames != classnames:
        raise ValueError(f"{train_dir} and {val_dir} hold different class folders")
    return DatasetSplits("ImageNet", classnames, train=train, val=[], test=test, image_dir=os.path.abspath(image_dir))


def _variant_classnames(root: str, variant_dir: str) -> Tuple[Dict[str, str], str]:
    local = os.path.join(variant_dir, "classnames.txt")
    shared = os.path.join(root, "imagenet", "classnames.txt")
    for path in (local, shared):
        if os.path.isfile(path):
            return read_wnid_classnames(path), path
    raise FileNotFoundError(f"class name file not found: {local} (nor {shared})")


def _read_imagenet_variant(root: str, name: str, dataset_dir: str, image_dir: str) -> DatasetSplits:
    variant_dir = require_dir(os.path.join(root, dataset_dir), "dataset folder")
    folder = require_dir(os.path.join(variant_dir, image_dir), "image folder")
    wnid2name, source = _variant_classnames(root, variant_dir)
    classnames, test = _read_wnid_folders(folder, wnid2name, source)
    return DatasetSplits(name, classnames, test=test, image_dir=os.path.abspath(folder))


def read_imagenet_v2(root: str) -> DatasetSplits:
    """Folders are named by the integer label; label i's name is line i of classnames.txt."""
    variant_dir = require_dir(os.path.join(root, "imagenetv2"), "dataset folder")
    folder = require_dir(
        os.path.join(variant_dir, "imagenetv2-matched-frequency-format-val"), "image folder"
    )
    wnid2name, source = _variant_classnames(root, variant_dir)
    classnames = list(wnid2name.values())
    test = []
    for entry in listdir_nohidden(folder):
        if not os.path.isdir(os.path.join(folder, entry)):
            continue
        if not entry.isdigit() or int(entry) >= len(classnames):
            raise ValueError(f"folder {os.path.join(folder, entry)} is not a label in 0..{len(classnames) - 1} ({source})")
        label = int(entry)
        class_dir = os.path.join(folder, entry)
        test.extend(Record(os.path.join(class_dir, n), label, classnames[label]) for n in image_files(class_dir))
    test.sort(key=lambda r: (r.label, r.path))
    return DatasetSplits("ImageNetV2", classnames, test=test, image_dir=os.path.abspath(folder))


def read_imagenet_sketch(root: str) -> DatasetSplits:
    return _read_imagenet_variant(root, "ImageNetSketch", "imagenet-sketch", "images")


def read_imagenet_a(root: str) -> DatasetSplits:
    return _read_imagenet_variant(root, "ImageNetA", "imagenet-adversarial", "imagenet-a")


def read_imagenet_r(root: str) -> DatasetSplits:
    return _read_imagenet_variant(root, "ImageNetR", "imagenet-rendition", "imagenet-r")
