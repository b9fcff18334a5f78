"""Readers for datasets in the CoOp layout, and a small torch Dataset over them.

Every reader returns a :class:`DatasetSplits`: ``classnames`` (index = label)
and ``train`` / ``val`` / ``test`` lists of :class:`Record` (absolute image
path, label, classname). :class:`ImageDataset` turns a list of records into a
torch dataset whose items are ``(image tensor, label)``. Everything this project knows per dataset
lives in this module: folders, readers, name aliases, the teacher's CoOp template and the
transfer protocols' target lists.

Expected layouts, all under one dataset root ``<root>`` (as in CoOp's
``DATASETS.md`` and ``datasets/*.py``)::

    Split-JSON datasets: <root>/<dataset_dir>/split_zhou_<Name>.json holds
    {"train"|"val"|"test": [[relpath, label, classname], ...]}, relpath is
    relative to the image folder <root>/<dataset_dir>/<image_dir>:

      Caltech101    caltech-101/    101_ObjectCategories/  split_zhou_Caltech101.json
      OxfordPets    oxford_pets/    images/                split_zhou_OxfordPets.json
      StanfordCars  stanford_cars/  (the dataset folder)   split_zhou_StanfordCars.json
      Flowers102    oxford_flowers/ jpg/                   split_zhou_OxfordFlowers.json
      Food101       food-101/       images/                split_zhou_Food101.json
      SUN397        sun397/         SUN397/                split_zhou_SUN397.json
      DTD           dtd/            images/                split_zhou_DescribableTextures.json
      EuroSAT       eurosat/        2750/                  split_zhou_EuroSAT.json
      UCF101        ucf101/         UCF-101-midframes/     split_zhou_UCF101.json

    FGVCAircraft  fgvc_aircraft/: variants.txt (one class name a line; label =
      line index), images_variant_{train,val,test}.txt (lines
      "<image id> <class name>"), images/<image id>.jpg.

    ImageNet      imagenet/classnames.txt (lines "<wnid> <class name>", in
      label order), imagenet/images/train/<wnid>/*, imagenet/images/val/<wnid>/*.
      Label = index of the wnid folder in sorted order (CoOp). train comes from
      images/train, test from images/val; val is left empty because ImageNet
      has no held-out validation split (CoOp reuses the test set there, which
      invites choosing epochs on test).

    ImageNet variants are test-only (train and val are empty). Their class
    names come from classnames.txt inside the variant folder (CoOp asks to
    copy it there) or, failing that, from <root>/imagenet/classnames.txt:
      ImageNetV2      imagenetv2/imagenetv2-matched-frequency-format-val/<label int>/*
      ImageNetSketch  imagenet-sketch/images/<wnid>/*
      ImageNetA       imagenet-adversarial/imagenet-a/<wnid>/*   (200 wnids)
      ImageNetR       imagenet-rendition/imagenet-r/<wnid>/*     (200 wnids)
    For -A and -R the labels are 0..199 over their sorted wnid folders, as
    in CoOp, so a classifier for them has 200 classes.

:func:`load_split_json_dataset` reads any "folder + split json" dataset
(user data, the synthetic demo data).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from PIL import Image, UnidentifiedImageError

from ..fileio import read_json

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class Record(NamedTuple):
    """One image: absolute path, integer label, class name."""

    path: str
    label: int
    classname: str


@dataclass
class DatasetSplits:
    """A dataset's class names and its three splits of records.

    ``image_dir`` is the folder the records' paths live under; the few-shot
    cache stores paths relative to it so a cache is portable across machines.
    """

    name: str
    classnames: List[str]
    train: List[Record] = field(default_factory=list)
    val: List[Record] = field(default_factory=list)
    test: List[Record] = field(default_factory=list)
    image_dir: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, name: str) -> List[Record]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {list(SPLITS)}")
        return getattr(self, name)


class ImageDataset(torch.utils.data.Dataset):
    """Items are ``(image tensor, label)``; without a transform the image is
    converted with ``to_tensor`` so an item is always a tensor."""

    def __init__(self, records: Sequence[Record], transform: Optional[Callable] = None):
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        record = self.records[index]
        image = load_image(record.path)
        if self.transform is not None:
            image = self.transform(image)
        else:
            from torchvision.transforms.functional import to_tensor

            image = to_tensor(image)
        return image, record.label


class TrainImageDataset(ImageDataset):
    """Training items ``(student image, teacher image, label, index)``: ``transform`` maps a PIL image
    to the (student, teacher) pair (:func:`drople_fast.training.data.transforms.train_views`), and
    ``index`` is the record's position, the key of
    :class:`drople_fast.training.teacher_cache.TeacherImageCache`."""

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
        record = self.records[index]
        student, teacher = self.transform(load_image(record.path))
        return student, teacher, record.label, index


def load_image(path: str) -> Image.Image:
    """Open an image as RGB; a missing or unreadable file is named in the error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path} is not a readable image: {exc}") from exc


# --------------------------------------------------------------------------
# helpers

def _require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _listdir_nohidden(path: str) -> List[str]:
    """Sorted entries without hidden files (CoOp's ``listdir_nohidden(sort=True)``)."""
    return sorted(name for name in os.listdir(path) if not name.startswith("."))


def _image_files(folder: str) -> List[str]:
    return [
        name
        for name in _listdir_nohidden(folder)
        if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, name))
    ]


def _check_images_exist(records: Iterable[Record]) -> None:
    missing = [r.path for r in records if not os.path.isfile(r.path)]
    if missing:
        shown = ", ".join(missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{len(missing)} image(s) not found: {shown}{more}")


def classnames_from_records(splits: Dict[str, List[Record]], source: str) -> List[str]:
    """Build ``classnames[label]``; labels must be 0..K-1 and map 1:1 to names.

    ``source`` names the file the records came from, for the error messages.
    """
    by_label: Dict[int, str] = {}
    by_name: Dict[str, int] = {}
    for split, records in splits.items():
        for r in records:
            if by_label.setdefault(r.label, r.classname) != r.classname:
                raise ValueError(
                    f"{source}: label {r.label} has two class names "
                    f"{by_label[r.label]!r} and {r.classname!r} (split {split!r}, {r.path})"
                )
            if by_name.setdefault(r.classname, r.label) != r.label:
                raise ValueError(
                    f"{source}: class name {r.classname!r} has two labels "
                    f"{by_name[r.classname]} and {r.label} (split {split!r}, {r.path})"
                )
    if not by_label:
        raise ValueError(f"{source}: no records in any split")
    num = max(by_label) + 1
    missing = [y for y in range(num) if y not in by_label]
    if missing or min(by_label) < 0:
        raise ValueError(
            f"{source}: labels must be 0..K-1 with no gaps; missing {missing[:10]}, "
            f"smallest {min(by_label)}"
        )
    return [by_label[y] for y in range(num)]


def confined_path(folder: str, relative: str, what: str) -> str:
    """``folder/relative``, refusing absolute paths and paths that leave ``folder`` (``..``), naming ``what``."""
    if os.path.isabs(relative):
        raise ValueError(f"{what}: image path {relative!r} is absolute; split files hold paths inside {folder}")
    base = os.path.normpath(os.path.abspath(folder))
    joined = os.path.normpath(os.path.join(base, relative))
    if joined == base or os.path.commonpath([base, joined]) != base:
        raise ValueError(f"{what}: image path {relative!r} leaves the image folder {folder}")
    return os.path.join(folder, relative)


def read_split_json(split_file: str, image_dir: str) -> Dict[str, List[Record]]:
    """Read a CoOp ``split_zhou_*.json``; paths are joined to ``image_dir``."""
    data = read_json(split_file, "split file")
    if not isinstance(data, dict):
        raise ValueError(f"{split_file}: expected an object with keys {list(SPLITS)}")
    out: Dict[str, List[Record]] = {}
    for split in SPLITS:
        if split not in data:
            raise ValueError(f"{split_file}: missing split {split!r}")
        items = data[split]
        if not isinstance(items, list):
            raise ValueError(f"{split_file}: split {split!r} is not a list")
        records = []
        for i, item in enumerate(items):
            ok = (
                isinstance(item, (list, tuple))
                and len(item) == 3
                and isinstance(item[0], str)
                and isinstance(item[1], int)
                and not isinstance(item[1], bool)
                and isinstance(item[2], str)
            )
            if not ok:
                raise ValueError(
                    f"{split_file}: {split}[{i}] = {item!r} is not [relative_path, int label, classname]"
                )
            records.append(Record(confined_path(image_dir, item[0], f"{split_file}: {split}[{i}]"), item[1], item[2]))
        out[split] = records
    return out


# --------------------------------------------------------------------------
# readers

def load_split_json_dataset(
    dataset_dir: str,
    split_file: Optional[str] = None,
    image_dir: Optional[str] = None,
    name: Optional[str] = None,
    check_images: bool = True,
) -> DatasetSplits:
    """Generic "folder + split json" reader.

    ``split_file`` and ``image_dir`` are relative to ``dataset_dir`` (absolute
    paths work too). Without ``split_file`` the folder must hold exactly one
    ``split_zhou_*.json``. Without ``image_dir`` the paths are relative to
    ``dataset_dir`` itself. ``check_images`` verifies every file exists now
    rather than at the first epoch.
    """
    _require_dir(dataset_dir, "dataset folder")
    if split_file is None:
        candidates = sorted(n for n in os.listdir(dataset_dir) if n.startswith("split_zhou_") and n.endswith(".json"))
        if len(candidates) != 1:
            raise FileNotFoundError(
                f"expected exactly one split_zhou_*.json in {dataset_dir}, found {candidates}"
            )
        split_file = candidates[0]
    split_path = os.path.join(dataset_dir, split_file)
    img_root = os.path.join(dataset_dir, image_dir) if image_dir else dataset_dir
    _require_dir(img_root, "image folder")
    splits = read_split_json(split_path, img_root)
    classnames = classnames_from_records(splits, split_path)
    if check_images:
        _check_images_exist(r for recs in splits.values() for r in recs)
    return DatasetSplits(
        name=name or os.path.basename(os.path.normpath(dataset_dir)),
        classnames=classnames,
        image_dir=os.path.abspath(img_root),
        **{k: v for k, v in splits.items()},
    )


def read_fgvc_aircraft(root: str, check_images: bool = True) -> DatasetSplits:
    """FGVCAircraft as CoOp reads it: variants.txt + images_variant_<split>.txt."""
    dataset_dir = _require_dir(os.path.join(root, "fgvc_aircraft"), "dataset folder")
    image_dir = _require_dir(os.path.join(dataset_dir, "images"), "image folder")
    variants = _require_file(os.path.join(dataset_dir, "variants.txt"), "class list")
    with open(variants, "r", encoding="utf-8") as f:
        classnames = [line.strip() for line in f if line.strip()]
    if len(set(classnames)) != len(classnames):
        raise ValueError(f"{variants}: duplicate class names")
    cname2lab = {c: i for i, c in enumerate(classnames)}
    splits: Dict[str, List[Record]] = {}
    for split in SPLITS:
        list_file = _require_file(os.path.join(dataset_dir, f"images_variant_{split}.txt"), "split file")
        records = []
        with open(list_file, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.strip().split(" ")
                if not parts or not parts[0]:
                    continue
                if len(parts) < 2:
                    raise ValueError(f"{list_file}:{lineno}: expected '<image id> <class name>', got {line.strip()!r}")
                classname = " ".join(parts[1:])
                if classname not in cname2lab:
                    raise ValueError(f"{list_file}:{lineno}: class {classname!r} is not in {variants}")
                records.append(Record(os.path.join(image_dir, parts[0] + ".jpg"), cname2lab[classname], classname))
        splits[split] = records
    if check_images:
        _check_images_exist(r for recs in splits.values() for r in recs)
    return DatasetSplits("FGVCAircraft", classnames, image_dir=os.path.abspath(image_dir), **splits)


def read_wnid_classnames(path: str) -> Dict[str, str]:
    """``classnames.txt``: lines "<wnid> <class name>", kept in file order."""
    _require_file(path, "class name file")
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
    wnids = [d for d in _listdir_nohidden(folder) if os.path.isdir(os.path.join(folder, d))]
    if not wnids:
        raise FileNotFoundError(f"no class folders in {folder}")
    unknown = [w for w in wnids if w not in wnid2name]
    if unknown:
        raise ValueError(f"class folders {unknown[:5]} in {folder} are not listed in {source}")
    records = []
    for label, wnid in enumerate(wnids):
        class_dir = os.path.join(folder, wnid)
        for name in _image_files(class_dir):
            records.append(Record(os.path.join(class_dir, name), label, wnid2name[wnid]))
    return [wnid2name[w] for w in wnids], records


def read_imagenet(root: str) -> DatasetSplits:
    dataset_dir = _require_dir(os.path.join(root, "imagenet"), "dataset folder")
    image_dir = _require_dir(os.path.join(dataset_dir, "images"), "image folder")
    source = os.path.join(dataset_dir, "classnames.txt")
    wnid2name = read_wnid_classnames(source)
    train_dir = _require_dir(os.path.join(image_dir, "train"), "ImageNet train folder")
    val_dir = _require_dir(os.path.join(image_dir, "val"), "ImageNet val folder")
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
    variant_dir = _require_dir(os.path.join(root, dataset_dir), "dataset folder")
    folder = _require_dir(os.path.join(variant_dir, image_dir), "image folder")
    wnid2name, source = _variant_classnames(root, variant_dir)
    classnames, test = _read_wnid_folders(folder, wnid2name, source)
    return DatasetSplits(name, classnames, test=test, image_dir=os.path.abspath(folder))


def read_imagenet_v2(root: str) -> DatasetSplits:
    """Folders are named by the integer label; label i's name is line i of classnames.txt."""
    variant_dir = _require_dir(os.path.join(root, "imagenetv2"), "dataset folder")
    folder = _require_dir(
        os.path.join(variant_dir, "imagenetv2-matched-frequency-format-val"), "image folder"
    )
    wnid2name, source = _variant_classnames(root, variant_dir)
    classnames = list(wnid2name.values())
    test = []
    for entry in _listdir_nohidden(folder):
        if not os.path.isdir(os.path.join(folder, entry)):
            continue
        if not entry.isdigit() or int(entry) >= len(classnames):
            raise ValueError(f"folder {os.path.join(folder, entry)} is not a label in 0..{len(classnames) - 1} ({source})")
        label = int(entry)
        class_dir = os.path.join(folder, entry)
        test.extend(Record(os.path.join(class_dir, n), label, classnames[label]) for n in _image_files(class_dir))
    test.sort(key=lambda r: (r.label, r.path))
    return DatasetSplits("ImageNetV2", classnames, test=test, image_dir=os.path.abspath(folder))


def read_imagenet_sketch(root: str) -> DatasetSplits:
    return _read_imagenet_variant(root, "ImageNetSketch", "imagenet-sketch", "images")


def read_imagenet_a(root: str) -> DatasetSplits:
    return _read_imagenet_variant(root, "ImageNetA", "imagenet-adversarial", "imagenet-a")


def read_imagenet_r(root: str) -> DatasetSplits:
    return _read_imagenet_variant(root, "ImageNetR", "imagenet-rendition", "imagenet-r")


# --------------------------------------------------------------------------
# registry

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
    _require_dir(root, "dataset root")
    if canonical in SPLIT_JSON_DATASETS:
        dataset_dir, image_dir, split_file = SPLIT_JSON_DATASETS[canonical]
        return load_split_json_dataset(
            os.path.join(root, dataset_dir), split_file, image_dir or None, name=canonical, check_images=check_images
        )
    if canonical == "FGVCAircraft":
        return read_fgvc_aircraft(root, check_images=check_images)
    return OTHER_READERS[canonical](root)
