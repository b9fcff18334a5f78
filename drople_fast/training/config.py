"""``TrainConfig``: every field of a run, its defaults (the release's) and its validation.

A config is checked when it is built, field by field, so a hand-edited ``config.json`` or a bad CLI
flag fails with the field named before anything runs. The CLI reads its defaults from here
(:func:`default_of`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ..clip.config import IWTDConfig
from .learner import LORA_RANK
from .losses import LossWeights
from .precision import check_precision
from .protocols import canonical_protocol

_INT_FIELDS = ("shots", "seed", "epochs", "batch_size", "lora_rank", "n_ctx", "text_depth", "vision_depth",
               "num_workers", "eval_batch_size")
_FLOAT_FIELDS = ("lr", "lora_lr", "weight_decay", "imbalance", "crop_scale_min")
_BOOL_FIELDS = ("teacher_cache", "resume", "progress", "allow_fewer", "tensorboard")
_STR_FIELDS = ("dataset", "root", "protocol", "model", "output_dir", "device", "augment", "precision")
_OPTIONAL_STR_FIELDS = ("pretrained", "descriptions", "fewshot_cache", "dataset_dir", "split_file", "image_dir",
                        "template")

# Fields of earlier versions, replaced when training took the release's recipe: their runs do not load.
_REMOVED_FIELDS = {"bf16": "now precision: auto | fp32 | bf16 | fp16",
                   "randaugment": "now augment: patch | none | randaugment | crop_flip",
                   "warmup_epochs": "the release's one-step warm-up has no option"}


def _nested_config(name: str, value, cls):
    """A nested config field: an instance of ``cls`` or a dict of its fields (as read from config.json)."""
    if isinstance(value, dict):
        try:
            return cls(**value)
        except TypeError as exc:
            raise ValueError(f"{name}: {exc}") from None
    if not isinstance(value, cls):
        raise ValueError(f"{name} must be a {cls.__name__} instance or a dict of its fields, "
                         f"got {type(value).__name__}")
    return value


@dataclass
class TrainConfig:
    """Everything a run needs (release defaults for ViT-B/16 prompt learning).

    ``model``: "tiny" (:func:`drople_fast.training.tiny_clip.create_tiny_clip`) or an
    open_clip model name such as "ViT-B-16" (use "ViT-B-16-quickgelu" with
    OpenAI weights). ``pretrained``: a local open_clip checkpoint, OpenAI
    TorchScript archive or Hugging Face CLIP folder (nothing downloads).
    ``iwtd``: an :class:`IWTDConfig` or a dict of its fields.
    ``shots`` <= 0 means the full training split.
    ``augment``: the training augmentation (:mod:`drople_fast.training.data.transforms`): "patch" (the
    release's per-patch RandAugment for the student, the clean image for the teacher), "none",
    or the former "randaugment" / "crop_flip" (RandomResizedCrop at ``crop_scale_min`` + flip, one
    image for student and teacher). ``teacher_cache``: with a clean teacher image, compute the
    teacher's image features once per training image (:mod:`drople_fast.training.teacher_cache`).
    """

    dataset: str = "Synthetic"
    root: str = "data"
    protocol: str = "base2novel"
    shots: int = 16
    seed: int = 1
    epochs: int = 20
    batch_size: int = 4
    lr: float = 2e-4
    lora_lr: float = 2e-5
    weight_decay: float = 5e-5
    model: str = "tiny"
    pretrained: Optional[str] = None
    iwtd: Any = field(default_factory=IWTDConfig)
    lora_rank: int = LORA_RANK  # on, as launched (release/scripts/launch/launch.sh:42); 0 turns LoRA off
    n_ctx: int = 4
    text_depth: int = 9
    vision_depth: int = 6
    loss_weights: Any = field(default_factory=LossWeights)
    descriptions: Optional[str] = None
    targets: Optional[List[str]] = None
    imbalance: float = 10.0
    augment: str = "patch"
    crop_scale_min: float = 0.08
    teacher_cache: bool = True
    output_dir: str = "runs/drople"
    fewshot_cache: Optional[str] = None
    device: str = "auto"
    num_workers: int = 0
    eval_batch_size: int = 64
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (drople_fast.training.precision)
    num_threads: Optional[int] = None
    resume: bool = False
    progress: bool = True
    # A dataset of your own (docs/own-data.md): the folder in the CoOp layout holding the split file and
    # the images; ``dataset`` names it. ``split_file`` (relative to dataset_dir; without dataset_dir a path
    # whose folder becomes dataset_dir), ``image_dir`` (inside it), ``template`` (the teacher's first template,
    # "{}" for the class name; also overrides a known dataset's).
    dataset_dir: Optional[str] = None
    split_file: Optional[str] = None
    image_dir: Optional[str] = None
    template: Optional[str] = None
    allow_fewer: bool = False  # a class with fewer training images than shots keeps all it has
    tensorboard: bool = True  # also log to <output_dir>/tensorboard when torch.utils.tensorboard imports

    def __post_init__(self):
        self._check_types()
        self.iwtd = _nested_config("iwtd", self.iwtd, IWTDConfig)
        self.loss_weights = _nested_config("loss_weights", self.loss_weights, LossWeights)
        self.protocol = canonical_protocol(self.protocol)
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.lora_lr < 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and lora_lr, weight_decay >= 0, got lr={self.lr}, "
                             f"lora_lr={self.lora_lr}, weight_decay={self.weight_decay}")
        for name in ("num_workers", "lora_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads (--threads) must be >= 1, got {self.num_threads}")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        from .data.transforms import AUGMENTATIONS, CLEAN_TEACHER

        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {list(AUGMENTATIONS)}, got {self.augment!r}")
        if self.crop_scale_min != _DEFAULT_CROP_SCALE_MIN and self.augment in CLEAN_TEACHER:
            raise ValueError(f"crop_scale_min only applies to the randaugment and crop_flip augmentations, "
                             f"not {self.augment!r} (which does not crop at random)")
        if not self.imbalance >= 1:
            raise ValueError(f"imbalance must be >= 1, got {self.imbalance}")
        if self.targets is not None and self.protocol not in ("cross_dataset", "dg"):
            raise ValueError(f"targets only apply to the cross_dataset and dg protocols, not {self.protocol}")
        if self.imbalance != _DEFAULT_IMBALANCE and self.protocol != "long_tail":
            raise ValueError(f"imbalance only applies to the long_tail protocol, not {self.protocol}")
        check_device_name(self.device)
        check_precision(self.precision)
        self._check_own_dataset()

    def _check_own_dataset(self) -> None:
        import os

        if self.template is not None and self.template.count("{}") != 1:
            raise ValueError(f"template must hold '{{}}' (the class name) exactly once, got {self.template!r}")
        if self.split_file is not None and self.dataset_dir is None:
            self.dataset_dir = os.path.dirname(os.path.abspath(self.split_file))
            self.split_file = os.path.basename(self.split_file)
        if self.dataset_dir is None:
            if self.image_dir is not None:
                raise ValueError("image_dir only applies to a dataset of your own (dataset_dir or split_file)")
            return
        if not self.dataset or self.dataset in (".", "..") or any(c in self.dataset for c in "/\\"):
            raise ValueError(f"dataset (the name of your dataset) must be a plain name, got {self.dataset!r}")

    @property
    def own_dataset(self) -> bool:
        """The dataset is the user's folder ``dataset_dir``, not a known one under ``root``."""
        return self.dataset_dir is not None

    def _check_types(self) -> None:
        """Field types, so a hand-edited config.json fails with the field named (not deep inside a run)."""
        def bad(name, want):
            return ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")

        for name in _INT_FIELDS + ("num_threads",):
            v = getattr(self, name)
            if (v is not None or name != "num_threads") and (isinstance(v, bool) or not isinstance(v, int)):
                raise bad(name, "an int")
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "a finite number")
            setattr(self, name, float(v))
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        for name in _STR_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise bad(name, "a string")
        for name in _OPTIONAL_STR_FIELDS:
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise bad(name, "a string or null")
        if self.targets is not None and (not isinstance(self.targets, (list, tuple))
                                         or not all(isinstance(t, str) for t in self.targets)):
            raise bad("targets", "a list of dataset names")
        if self.targets is not None:
            self.targets = list(self.targets)

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["iwtd"]["vision_layers"] = list(d["iwtd"]["vision_layers"])
        d["iwtd"]["text_layers"] = list(d["iwtd"]["text_layers"])
        return d

    @classmethod
    def from_dict(cls, d: Dict) -> "TrainConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a TrainConfig must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        removed = sorted(set(d) & set(_REMOVED_FIELDS))
        if removed:
            raise ValueError("a config from an earlier drople_fast: " + "; ".join(
                f"{k!r} is gone ({_REMOVED_FIELDS[k]})" for k in removed) + "; start a new run")
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {unknown}")
        return cls(**d)


_DEFAULT_IMBALANCE = 10.0
_DEFAULT_CROP_SCALE_MIN = 0.08
TRAIN_DEFAULTS = TrainConfig.__dataclass_fields__  # CLI defaults are read from here


def default_of(name: str):
    """The TrainConfig default of field ``name`` (the CLI's defaults come from here)."""
    f = TrainConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def check_device_name(name: str) -> None:
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
