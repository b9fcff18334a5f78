"""Training and evaluation: ``drople_fast.train(TrainConfig(...))``.

The run directory (files, lock, fingerprint, checksums, clean-up) is owned by
:mod:`drople_fast.training.run_dir`. ``resume=True`` continues from its
checkpoint with every state restored (learner, patch step counters,
optimizer, scheduler, every RNG state), so the final weights are bitwise
those of an uninterrupted run; a finished run with the same fingerprint is
returned as it is. The model of the last epoch is evaluated; no test split
is ever used for selection. A non-finite loss or weight stops the run with
an error naming the epoch and step; such a run is never marked finished.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1) training uses
DistributedDataParallel (gloo on CPU, nccl on CUDA) with a
DistributedSampler; rank 0 writes the run directory and evaluates.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..clip.config import IWTDConfig
from ..clip.seeds import derive_seed
from .fileio import atomic_json, atomic_text, read_json_object
from .losses import LossWeights
from .precision import autocast, check_precision, grad_scaler, resolve_precision
from . import run_dir as rd
from ..clip.patch import apply, load_patch_state_dict, patch_state_dict
from .protocols import Plan, build_plan, canonical_protocol, metrics_from_accuracies
from .report import to_markdown
from .learner import LORA_RANK

CHECKPOINT = rd.CHECKPOINT
load_checkpoint = rd.load_checkpoint


class NonFiniteError(ValueError):
    """Training diverged (a NaN or infinite loss or weight)."""


_INT_FIELDS = ("shots", "seed", "epochs", "batch_size", "lora_rank", "n_ctx", "text_depth", "vision_depth",
               "num_workers", "eval_batch_size")
_FLOAT_FIELDS = ("lr", "lora_lr", "weight_decay", "imbalance", "crop_scale_min")
_BOOL_FIELDS = ("teacher_cache", "resume", "progress")
_STR_FIELDS = ("dataset", "root", "protocol", "model", "output_dir", "device", "augment", "precision")
_OPTIONAL_STR_FIELDS = ("pretrained", "descriptions", "fewshot_cache")

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


# --------------------------------------------------------------------------
# setup helpers
# --------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device_name(name)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available")
    return device


def build_clip(model: str, pretrained: Optional[str] = None, device: torch.device = torch.device("cpu")):
    """An (unpatched) open_clip model, with local weights loaded if ``pretrained`` is given."""
    import open_clip

    from .pretrained import load_pretrained
    from .tiny_clip import create_tiny_clip

    if model == "tiny":
        clip = create_tiny_clip(seed=0)
    else:
        if model not in open_clip.list_models():
            raise ValueError(f"unknown model {model!r}; use 'tiny' or an open_clip name such as 'ViT-B-16'")
        clip = open_clip.create_model(model, pretrained=None)
    if pretrained is not None:
        if not os.path.exists(pretrained):
            raise FileNotFoundError(f"pretrained weights not found: {pretrained}")
        load_pretrained(clip, pretrained)
    return clip.to(device)


def image_size_of(clip) -> int:
    size = clip.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _dist_info() -> Tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _np_state() -> List:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]


def _set_np_state(state: List) -> None:
    name, keys, pos, has_gauss, gauss = state
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _rng_state(loader_gen: torch.Generator) -> Dict:
    state = {"torch": torch.get_rng_state(), "numpy": _np_state(), "random": list(random.getstate()),
             "loader": loader_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict, loader_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    _set_np_state(state["numpy"])
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    loader_gen.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# The release's learning-rate floors (release/train_drople.py:243): 1e-5 for the prompts' group,
# max(lora_lr / lr * 1e-5, 5e-6) for LoRA's.
MIN_LR, LORA_MIN_LR = 1e-5, 5e-6


def release_lr_lambda(min_lr: float, base_lr: float, num_warmup_steps: int, num_training_steps: int,
                      num_cycles: float = 0.5):
    """The release's ``get_cosine_schedule_lambda_with_warmup`` (release/train_drople.py:40-47): linear
    warm-up, then a half cosine, both floored at ``min_lr / base_lr`` (a group with lr 0 stays at 0)."""
    floor = min_lr / base_lr if base_lr > 0 else 0.0

    def f(step: int) -> float:
        if step < num_warmup_steps:
            return max(floor, float(step) / float(max(1, num_warmup_steps)))
        progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
        return max(floor, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The release's LambdaLR over ``optimizer``'s groups [prompts, LoRA?] (release/train_drople.py:239-254):
    one warm-up step, ``max(epochs, 20) + 1`` steps in all, each group floored at its own min lr.
    :func:`train_one_epoch` steps it as the release does: once a tenth into epoch 0, once after every epoch."""
    groups = optimizer.param_groups
    lr = groups[0]["lr"]
    min_lrs = [MIN_LR] + [max(g["lr"] / lr * MIN_LR, LORA_MIN_LR) for g in groups[1:]]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [
        release_lr_lambda(m, g["lr"], 1, max(epochs, 20) + 1) for m, g in zip(min_lrs, groups)])


# --------------------------------------------------------------------------
# building blocks shared by train and evaluate
# --------------------------------------------------------------------------


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def fewshot_cache_dir(cfg: TrainConfig) -> Optional[str]:
    """Where few-shot samples are cached: ``--fewshot-cache``, else ``<root>/split_fewshot``, else (a
    read-only root) ``$XDG_CACHE_HOME/drople_fast/split_fewshot`` (logged); None if nothing is writable."""
    if cfg.fewshot_cache is not None:
        return cfg.fewshot_cache
    cache = os.path.join(cfg.root, "split_fewshot")
    if _writable_dir(cache):
        return cache
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    fallback = os.path.join(base, "drople_fast", "split_fewshot")
    if _writable_dir(fallback):
        print(f"drople-fast: {cache} is not writable; caching few-shot samples in {fallback}", file=sys.stderr)
        return fallback
    print(f"drople-fast: {cache} and {fallback} are not writable; few-shot samples are not cached "
          "(they are seeded, so nothing changes)", file=sys.stderr)
    return None


def make_plan(cfg: TrainConfig) -> Plan:
    cache = fewshot_cache_dir(cfg)
    return build_plan(cfg.protocol, cfg.dataset, cfg.root, cfg.shots, cfg.seed, cache_dir=cache,
                      targets=cfg.targets, imbalance=cfg.imbalance)


def make_learner(cfg: TrainConfig, clip, classnames: Sequence[str], rank: int = 0):
    from .learner import DroPLe

    iwtd = dataclasses.replace(cfg.iwtd, seed=derive_seed(cfg.iwtd.seed, cfg.seed, rank))
    apply(clip, iwtd)
    return DroPLe(clip, classnames, n_ctx=cfg.n_ctx, text_depth=cfg.text_depth, vision_depth=cfg.vision_depth,
                  lora_rank=cfg.lora_rank, dataset=_dataset_of(cfg), descriptions=cfg.descriptions,
                  loss_weights=cfg.loss_weights)


def _dataset_of(cfg: TrainConfig) -> str:
    from .data import canonical_name

    return canonical_name(cfg.dataset)


@torch.no_grad()
def evaluate_split(learner, records, classnames, device, image_size: int, batch_size: int = 64,
                   num_workers: int = 0, precision: str = "auto", progress: bool = True, desc: str = "eval"):
    """(prompted accuracy %, zero-shot accuracy %) of ``learner`` on ``records``."""
    from tqdm.auto import tqdm

    from .data import ImageDataset, eval_transform

    was_training = learner.training
    learner.eval()
    previous = list(learner.classnames)
    try:
        learner.set_classnames(classnames)
        loader = torch.utils.data.DataLoader(ImageDataset(records, eval_transform(image_size)),
                                             batch_size=batch_size, shuffle=False, num_workers=num_workers)
        correct = zs_correct = total = 0
        with autocast(precision, device):
            txt = learner.text_features()
            txt_zs = learner.teacher_text_features()
            for images, labels in tqdm(loader, desc=desc, leave=False, disable=not progress):
                images, labels = images.to(device), labels.to(device)
                img = learner.image_features(images)
                correct += int((learner.logits(img, txt).argmax(-1) == labels).sum())
                img_zs = learner.teacher_image_features(images)
                zs_correct += int(((img_zs @ txt_zs.t()).argmax(-1) == labels).sum())
                total += labels.numel()
    finally:
        if previous:
            learner.set_classnames(previous)
        learner.train(was_training)
    if total == 0:
        raise ValueError(f"{desc}: nothing to evaluate")
    return 100.0 * correct / total, 100.0 * zs_correct / total


def evaluate_plan(learner, plan: Plan, cfg: TrainConfig, device, image_size: int) -> Tuple[Dict, Dict]:
    accs, zs = {}, {}
    for split in plan.evals:
        accs[split.name], zs[split.name] = evaluate_split(
            learner, split.records, split.classnames, device, image_size, cfg.eval_batch_size, cfg.num_workers,
            cfg.precision, cfg.progress, desc=f"eval {split.dataset}")
    return metrics_from_accuracies(plan, accs), metrics_from_accuracies(plan, zs)


def results_table(plan: Plan, metrics: Dict, zero_shot: Dict) -> str:
    """Markdown table of zero-shot CLIP vs DroPLe on the plan's metrics."""
    keys = [s.name for s in plan.evals] + (["hm"] if plan.protocol == "base2novel" else [])
    label = {"base_acc": "Base", "novel_acc": "Novel", "hm": "HM", "acc": plan.dataset}
    head = ["Method"] + [label.get(k, k.replace("acc_", "")) for k in keys]
    methods = (("Zero-shot CLIP", zero_shot), (f"DroPLe ({metrics.get('_mode', '')})".replace(" ()", ""), metrics))
    return to_markdown(head, [[name] + [(m[k], None) for k in keys] for name, m in methods])


def final_metrics(cfg: TrainConfig, plan: Plan, accs: Dict, zs: Dict, info: Dict) -> Dict:
    """``metrics.json`` in the schema of :mod:`drople_fast.training.report`."""
    out: Dict[str, Any] = {"dataset": plan.dataset, "seed": cfg.seed, "protocol": plan.protocol,
                           "method": f"drople-{cfg.iwtd.mode}"}
    if plan.protocol == "few_shot":
        out["shots"] = cfg.shots
    out.update({k: float(v) for k, v in accs.items()})
    out.update({f"zs_{k}": float(v) for k, v in zs.items()})
    if "images_per_s" in info:
        out["images_per_s"] = float(info["images_per_s"])
    out["info"] = info
    return out


# --------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------


@dataclass
class TrainingSetup:
    learner: Any
    loader: Any
    sampler: Any
    generator: torch.Generator
    optimizer: Any
    scheduler: Any
    image_size: int
    teacher_cache: Any = None


def build_training(cfg: TrainConfig, plan: Plan, clip, device: torch.device, world: int = 1,
                   rank: int = 0) -> TrainingSetup:
    """Learner, seeded data loader, AdamW (LoRA at its own lr) and the release's schedule for ``plan``."""
    from .data import TrainImageDataset, train_views

    learner = make_learner(cfg, clip, plan.train_classnames, rank).to(device)
    image_size = image_size_of(clip)
    dataset = TrainImageDataset(plan.train_records, train_views(cfg.augment, image_size,
                                                                crop_scale=(cfg.crop_scale_min, 1.0)))
    gen = torch.Generator().manual_seed(cfg.seed)
    drop_last = len(dataset) >= cfg.batch_size * world
    if world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=world, rank=rank,
                                                                  shuffle=True, seed=cfg.seed, drop_last=drop_last)
    else:
        sampler = torch.utils.data.RandomSampler(dataset, generator=gen)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                                         num_workers=cfg.num_workers, drop_last=drop_last, generator=gen,
                                         worker_init_fn=_worker_init, persistent_workers=False)
    # The release's two groups (release/train_drople.py:94-112): LoRA at lora_lr, everything else trainable
    # (prompts, bridge, logit scale) at lr, both with the weight decay; AdamW with betas (0.9, 0.999)
    # (release/flags.py:78) and torch's eps (train_drople.py:225-227, torch.optim.AdamW).
    lora = [p for n, p in learner.trainable_named_parameters() if n.startswith("lora.")]
    rest = [p for n, p in learner.trainable_named_parameters() if not n.startswith("lora.")]
    groups = [{"params": rest, "lr": cfg.lr}] + ([{"params": lora, "lr": cfg.lora_lr}] if lora else [])
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.epochs)
    return TrainingSetup(learner, loader, sampler, gen, optimizer, scheduler, image_size)


def uses_teacher_cache(cfg: TrainConfig) -> bool:
    """The teacher's image features come from :mod:`.teacher_cache`: asked for, and the teacher's image is
    the clean one (the "randaugment" / "crop_flip" teacher sees the random student image)."""
    from .data import CLEAN_TEACHER

    return cfg.teacher_cache and cfg.augment in CLEAN_TEACHER


def build_teacher_cache(cfg: TrainConfig, plan: Plan, setup: TrainingSetup, device: torch.device,
                        world: int = 1, rank: int = 0):
    """The teacher image features of ``plan``'s training records, in chunks of the per-rank batch
    size (the loader's batch; :mod:`.teacher_cache` says why). Under DDP every rank computes its
    share of the chunks and all ranks get the whole table (the sampler reshuffles the images over
    the ranks every epoch); rank 0 writes the file."""
    from .teacher_cache import build_teacher_cache as build

    n = len(plan.train_records)
    # without drop_last (fewer images than one batch over all ranks) each rank has one batch of ceil(n / world)
    chunk = cfg.batch_size if setup.loader.drop_last else min(cfg.batch_size, -(-n // world))
    return build(setup.learner, [r.path for r in plan.train_records], setup.image_size, device, chunk,
                 lambda: autocast(cfg.precision, device), cache_dir=fewshot_cache_dir(cfg),
                 num_workers=cfg.num_workers, world=world, rank=rank)


def train_one_epoch(model, loader, optimizer, scheduler, device, precision: str, epoch: int, epochs: int,
                    world: int = 1, teacher_cache=None, scaler=None) -> Tuple[Dict[str, float], int, int]:
    """One pass over ``loader``: (summed loss terms, batches, images over all ranks).

    As the release's ``train`` (release/train_drople.py:363-384): the scheduler steps once before batch
    ``len(loader) // 10`` of epoch 0 (ending its one-step warm-up) and once after the epoch; the learner
    gets the integer ``epoch`` for the residual-entropy λ (``current_epoch=epoch``, :375).

    Batches are ``(student images, teacher images, labels, dataset indices)``
    (:class:`~drople_fast.training.data.TrainImageDataset`). The frozen teacher gets its image
    features from ``teacher_cache`` (by dataset index) when given, else runs on the teacher images.

    ``scaler``: the fp16 loss scaler (:func:`drople_fast.training.precision.grad_scaler`); None makes one
    for ``precision`` (disabled, a no-op, unless fp16).

    Raises :class:`NonFiniteError` naming the epoch and step on a NaN/inf loss (checked on the value
    already copied to the host for the running sums: no extra synchronisation).
    """
    sums: Dict[str, float] = {}
    n_batches = n_images = 0
    steps = len(loader)
    if scaler is None:
        scaler = grad_scaler(precision, device)
    for step, (images, teacher_images, labels, index) in enumerate(loader):
        if epoch == 0 and step == steps // 10:
            with warnings.catch_warnings():
                # With < 10 batches this precedes the first optimizer step, as in the release; torch's warning
                # that the schedule's first value is skipped is then exactly the release's behaviour.
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                scheduler.step()
        images, labels = images.to(device), labels.to(device)
        if teacher_cache is not None:
            teacher = {"teacher_features": teacher_cache[index]}
        else:
            teacher = {"teacher_images": teacher_images.to(device)}
        with autocast(precision, device):
            _, terms = model(images, labels, epoch, epochs, **teacher)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms["total"]).backward()
        scaler.step(optimizer)  # skipped (and the scale lowered) when fp16 gradients overflowed
        scaler.update()
        for k, v in terms.items():
            value = float(v.detach())
            if not math.isfinite(value):
                raise NonFiniteError(f"training diverged: loss term {k!r} is {value} at epoch {epoch + 1} step "
                                     f"{step + 1} of {steps}; the run is stopped (lower --lr?)")
            sums[k] = sums.get(k, 0.0) + value
        n_batches += 1
        n_images += labels.numel() * world
    scheduler.step()
    return sums, n_batches, n_images


def _check_finite_weights(learner, epoch: int) -> None:
    params = [p for _, p in learner.trainable_named_parameters()]
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        bad = [n for n, p in learner.trainable_named_parameters() if not bool(torch.isfinite(p).all())]
        raise NonFiniteError(f"training diverged: non-finite weights after epoch {epoch + 1} ({', '.join(bad[:3])})")


def _execution(cfg: TrainConfig, device: torch.device) -> Dict:
    """What results depend on besides the fingerprint: recorded in checkpoints, checked on resume."""
    return {"num_threads": torch.get_num_threads(), "num_workers": cfg.num_workers,
            "precision": resolve_precision(cfg.precision, device)}  # what precision "auto" was on this device


def _check_resume(ckpt: Dict, cfg: TrainConfig, fp: Dict, path: str, device: torch.device) -> None:
    diff = rd.fingerprint_diff(ckpt["fingerprint"], fp)
    if diff:
        raise rd.RunDirError(f"cannot resume from {path}: configuration differs ({'; '.join(diff[:6])})")
    if ckpt["epoch"] > cfg.epochs:
        raise rd.RunDirError(f"cannot resume from {path}: its epoch {ckpt['epoch']} exceeds epochs={cfg.epochs}")
    saved = ckpt["execution"]
    if cfg.num_threads is None and torch.get_num_threads() != saved["num_threads"]:
        torch.set_num_threads(saved["num_threads"])  # CPU reductions depend on the thread count
    now = _execution(cfg, device)
    for name, flag in (("num_threads", "--threads"), ("num_workers", "--num-workers")):
        if now[name] != saved[name]:
            raise rd.RunDirError(f"cannot resume from {path} bit-exactly: it ran with {name}={saved[name]}, now "
                                 f"{now[name]} (results depend on it); pass {flag} {saved[name]}")
    # The fingerprint holds the precision asked for; "auto" resolves per device type (checkpoints written
    # before precision existed lack it).
    if "precision" in saved and now["precision"] != saved["precision"]:
        raise rd.RunDirError(f"cannot resume from {path}: it ran with precision={saved['precision']} "
                             f"(precision {cfg.precision!r} on its device), now {now['precision']} on {device.type}; "
                             "resume it on the device type it ran on")


def train(config: TrainConfig | Dict) -> Dict:
    """Train DroPLe as ``config`` says and return the final metrics (also in ``metrics.json``)."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))
    world, rank, local_rank = _dist_info()
    distributed = world > 1
    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if (cfg.device != "cpu" and torch.cuda.is_available()) else "gloo"
            dist.init_process_group(backend)
        if cfg.device == "auto" and torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = resolve_device(cfg.device)
    else:
        device = resolve_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _train(cfg, device, world, rank, distributed)
    finally:
        if distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _train(cfg: TrainConfig, device: torch.device, world: int, rank: int, distributed: bool) -> Dict:
    from tqdm.auto import tqdm

    main = rank == 0
    # Everything that can fail on bad input happens before the run directory is touched.
    plan = make_plan(cfg)
    fp = rd.fingerprint(cfg.to_dict(), plan, cfg.root)
    run = rd.RunDir(cfg.output_dir).open() if main else None
    failed = True
    try:
        resume_ckpt = None
        if main:
            run.check_fingerprint(fp)
            holds_run = any(run.has(n) for n in (rd.CHECKPOINT, rd.METRICS, rd.CONFIG))
            if holds_run and not cfg.resume:
                raise rd.RunDirError(f"run directory {cfg.output_dir} already holds a run; pass resume=True "
                                     "(--resume) to continue or reuse it, or pick another")
            if run.has(rd.METRICS) and not distributed:
                from .report import read_metrics

                metrics = read_metrics(run.file(rd.METRICS))  # finished, same fingerprint: nothing to do
                metrics.pop("_path", None)
                failed = False
                return metrics
            if run.has(rd.CHECKPOINT):
                resume_ckpt = rd.load_checkpoint(run.checkpoint_path)
                _check_resume(resume_ckpt, cfg, fp, run.checkpoint_path, device)
        elif cfg.resume:
            path = os.path.join(cfg.output_dir, CHECKPOINT)
            resume_ckpt = rd.load_checkpoint(path) if os.path.isfile(path) else None
        clip = build_clip(cfg.model, cfg.pretrained, device)
        seed_everything(cfg.seed)
        setup = build_training(cfg, plan, clip, device, world, rank)
        learner, loader, sampler, gen = setup.learner, setup.loader, setup.sampler, setup.generator
        optimizer, scheduler, image_size = setup.optimizer, setup.scheduler, setup.image_size
        if uses_teacher_cache(cfg):
            setup.teacher_cache = build_teacher_cache(cfg, plan, setup, device, world, rank)
        scaler = grad_scaler(cfg.precision, device)

        start_epoch, history = 0, []
        if resume_ckpt is not None:
            learner.load_prompt_state_dict(resume_ckpt["learner"], CHECKPOINT)
            load_patch_state_dict(clip, resume_ckpt["patch"])
            optimizer.load_state_dict(resume_ckpt["optimizer"])
            scheduler.load_state_dict(resume_ckpt["scheduler"])
            scaler.load_state_dict(resume_ckpt.get("scaler", {}))  # {} = no fp16 scaler (a no-op load)
            _set_rng_state(resume_ckpt["rng"], gen)
            start_epoch, history = int(resume_ckpt["epoch"]), list(resume_ckpt["history"])

        model = learner
        if distributed:
            model = torch.nn.parallel.DistributedDataParallel(
                learner, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

        out = cfg.output_dir
        if main:
            run.start(cfg.to_dict(), fp)
        train_time = sum(h["time_s"] for h in history)
        images_seen = sum(h["images"] for h in history)
        bar = tqdm(range(start_epoch, cfg.epochs), desc=f"train {plan.dataset}", disable=not (cfg.progress and main),
                   initial=start_epoch, total=cfg.epochs)
        for epoch in bar:
            if distributed:
                sampler.set_epoch(epoch)
            learner.train()
            lr_now = optimizer.param_groups[0]["lr"]
            t0 = time.perf_counter()
            sums, n_batches, n_images = train_one_epoch(model, loader, optimizer, scheduler, device, cfg.precision,
                                                        epoch, cfg.epochs, world, setup.teacher_cache, scaler)
            _check_finite_weights(learner, epoch)
            elapsed = time.perf_counter() - t0
            train_time += elapsed
            images_seen += n_images
            record = {"epoch": epoch + 1, "loss": sums.get("total", 0.0) / max(1, n_batches),
                      **{f"loss_{k}": v / max(1, n_batches) for k, v in sums.items() if k != "total"},
                      "lr": lr_now, "time_s": elapsed, "images": n_images,
                      "images_per_s": n_images / elapsed if elapsed > 0 else 0.0}
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if main:
                run.save_checkpoint({"format": rd.CHECKPOINT_FORMAT, "epoch": epoch + 1, "config": cfg.to_dict(),
                                     "fingerprint": fp, "execution": _execution(cfg, device),
                                     "learner": learner.prompt_state_dict(), "patch": patch_state_dict(clip),
                                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                     "scaler": scaler.state_dict(), "rng": _rng_state(gen), "history": history})
                run.write_history(history)
        bar.close()
        if distributed:
            torch.distributed.barrier()
        if not main:
            failed = False
            return {}
        accs, zs = evaluate_plan(learner, plan, cfg, device, image_size)
        info = {"epochs": cfg.epochs, "shots": cfg.shots, "mode": cfg.iwtd.mode, "model": cfg.model,
                "pretrained": cfg.pretrained, "world_size": world, "train_time_s": train_time,
                "images_per_s": images_seen / train_time if train_time > 0 else 0.0,
                "final_loss": history[-1]["loss"] if history else None, "run_dir": os.path.abspath(out)}
        metrics = final_metrics(cfg, plan, accs, zs, info)
        run.write_results(results_table(plan, {**accs, "_mode": cfg.iwtd.mode}, zs))
        run.write_metrics(metrics)
        failed = False
        return metrics
    finally:
        if main:
            run.close(failed)


# --------------------------------------------------------------------------
# evaluate a finished (or checkpointed) run
# --------------------------------------------------------------------------


def evaluate(run_dir: str, checkpoint: Optional[str] = None, dataset: Optional[str] = None,
             root: Optional[str] = None, protocol: Optional[str] = None, device: str = "auto",
             progress: bool = True, write: bool = True) -> Dict:
    """Evaluate the learner saved in ``run_dir`` (or ``checkpoint``); optionally on another
    dataset/protocol. Writes ``eval/<dataset>_<protocol>.json`` and ``.md`` in the run dir."""
    config_path = os.path.join(run_dir, rd.CONFIG)
    try:
        cfg = TrainConfig.from_dict(read_json_object(config_path, "run config"))
    except ValueError as exc:
        raise ValueError(f"run config {config_path} is not valid: {exc}") from None
    ckpt_path = checkpoint or os.path.join(run_dir, CHECKPOINT)
    ckpt = load_checkpoint(ckpt_path)
    diff = rd.fingerprint_diff(ckpt["fingerprint"]["config"], rd.fingerprint(cfg.to_dict(), None, "")["config"]) \
        if isinstance(ckpt["fingerprint"], dict) and "config" in ckpt["fingerprint"] else ["fingerprint: malformed"]
    if diff:
        raise rd.RunDirError(f"{config_path} does not describe {ckpt_path} ({'; '.join(diff[:6])})")
    overrides = {k: v for k, v in (("dataset", dataset), ("root", root), ("protocol", protocol)) if v is not None}
    ecfg = dataclasses.replace(cfg, device=device, progress=progress, **overrides)
    plan = make_plan(ecfg)
    dev = resolve_device(device)
    clip = build_clip(cfg.model, cfg.pretrained, dev)
    seed_everything(cfg.seed)
    learner = make_learner(cfg, clip, plan.train_classnames).to(dev)
    learner.load_prompt_state_dict(ckpt["learner"], ckpt_path)
    try:
        load_patch_state_dict(clip, ckpt["patch"])
    except (RuntimeError, KeyError) as exc:
        raise ValueError(f"{ckpt_path} does not match the model: {exc}".splitlines()[0]) from exc
    accs, zs = evaluate_plan(learner, plan, ecfg, dev, image_size_of(clip))
    metrics = final_metrics(ecfg, plan, accs, zs, {"checkpoint": os.path.abspath(ckpt_path),
                                                   "epoch": ckpt["epoch"], "mode": cfg.iwtd.mode})
    metrics["table"] = results_table(plan, {**accs, "_mode": cfg.iwtd.mode}, zs)
    if write:
        folder = os.path.join(run_dir, "eval")
        os.makedirs(folder, exist_ok=True)
        stem = f"{plan.dataset}_{plan.protocol}"
        atomic_text(os.path.join(folder, stem + ".md"), metrics["table"])
        # not named metrics.json, so report never mixes re-evaluations with training runs
        atomic_json(os.path.join(folder, stem + ".json"), metrics)
    return metrics
