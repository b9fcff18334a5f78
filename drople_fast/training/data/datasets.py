"""Readers for datasets in the CoOp layout, and a small torch Dataset over them.

Every reader returns a :class:`DatasetSplits`: ``classnames`` (index = label)
and ``train`` / ``val`` / ``test`` lists of :class:`Record` (absolute image
path, label, classname). :class:`ImageDataset` turns a list of records into a
torch dataset whose items are ``(image tensor, label)``. The ImageNet readers are in
:mod:`.imagenet`; what the project knows per dataset name (folders, readers, aliases, the teacher's
CoOp template, the transfer protocols' targets) is in :mod:`.catalog`.

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

def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def listdir_nohidden(path: str) -> List[str]:
    """Sorted entries without hidden files (CoOp's ``listdir_nohidden(sort=True)``)."""
    return sorted(name for name in os.listdir(path) if not name.startswith("."))


def image_files(folder: str) -> List[str]:
    return [
        name
        for name in listdir_nohidden(folder)
        if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, name))
    ]


def _check_images_exist(records: Iterable[Record]) -> None:
    missing = [r.path for r in records if not os.path.isfile(r.path)]
    if missing:
        shown = ", ".join(missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{len(missing)} image(s) not found: {shown}{more}")


def check_readable(records: Iterable[Record]) -> None:
    """Every image exists and its header decodes (``PIL.Image.open`` reads the header only, so this costs
    a file open per image, not a decode); the first bad file is named."""
    for r in records:
        if not os.path.isfile(r.path):
            raise FileNotFoundError(f"image not found: {r.path} (class {r.classname!r})")
        try:
            with Image.open(r.path) as im:
                im.size  # noqa: B018 - the header is parsed on open; size proves it was
        except (UnidentifiedImageError, OSError) as exc:
            reason = " ".join(str(exc).replace(repr(r.path), "").replace(r.path, "").split())  # PIL repeats the path
            raise ValueError(f"{r.path} (class {r.classname!r}) is not a readable image: {reason}") from exc


def check_no_duplicates(splits: Dict[str, List[Record]], source: str) -> None:
    """The same image twice in one split (it would count twice) or in two splits (test images seen in
    training) is an error naming the file, the image and the splits."""
    first: Dict[str, str] = {}
    for split, records in splits.items():
        for r in records:
            seen = first.get(r.path)
            if seen is not None:
                where = f"twice in split {split!r}" if seen == split else f"in splits {seen!r} and {split!r}"
                raise ValueError(f"{source}: image {r.path} is listed {where}; each image belongs to one "
                                 "split, once")
            first[r.path] = split


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
    low, top = min(by_label), max(by_label)
    if low < 0:
        raise ValueError(f"{source}: label {low} (class {by_label[low]!r}) is out of range: labels must be "
                         f"0..K-1 with no gaps")
    missing = [y for y in range(top + 1) if y not in by_label]
    if missing:
        raise ValueError(
            f"{source}: labels must be 0..K-1 with no gaps; {len(by_label)} class names but label {top} "
            f"(class {by_label[top]!r}), and no entry has label {missing[:10]}"
        )
    return [by_label[y] for y in range(top + 1)]


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
    rather than at the first epoch. An image listed twice is refused (:func:`check_no_duplicates`).
    """
    require_dir(dataset_dir, "dataset folder")
    if split_file is None:
        candidates = sorted(n for n in os.listdir(dataset_dir) if n.startswith("split_zhou_") and n.endswith(".json"))
        if len(candidates) != 1:
            raise FileNotFoundError(
                f"expected exactly one split_zhou_*.json in {dataset_dir}, found {candidates}"
            )
        split_file = candidates[0]
    split_path = os.path.join(dataset_dir, split_file)
    img_root = os.path.join(dataset_dir, image_dir) if image_dir else dataset_dir
    require_dir(img_root, "image folder")
    splits = read_split_json(split_path, img_root)
    classnames = classnames_from_records(splits, split_path)
    check_no_duplicates(splits, split_path)
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
    dataset_dir = require_dir(os.path.join(root, "fgvc_aircraft"), "dataset folder")
    image_dir = require_dir(os.path.join(dataset_dir, "images"), "image folder")
    variants = require_file(os.path.join(dataset_dir, "variants.txt"), "class list")
    with open(variants, "r", encoding="utf-8") as f:
        classnames = [line.strip() for line in f if line.strip()]
    if len(set(classnames)) != len(classnames):
        raise ValueError(f"{variants}: duplicate class names")
    cname2lab = {c: i for i, c in enumerate(classnames)}
    splits: Dict[str, List[Record]] = {}
    for split in SPLITS:
        list_file = require_file(os.path.join(dataset_dir, f"images_variant_{split}.txt"), "split file")
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
