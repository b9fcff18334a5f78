"""What a run is built from: the device, the CLIP model, the protocol's plan, the learner, the seeded
data loader, the optimiser with the release's schedule, and the teacher cache. Shared by
:func:`drople_fast.training.trainer.train` and :func:`~drople_fast.training.trainer.evaluate`."""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..clip.patch import apply
from ..clip.seeds import derive_seed
from .config import TrainConfig, check_device_name
from .precision import autocast
from .protocols import Plan, build_plan
from .rng import worker_init
from .schedule import build_scheduler


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

    from .pretrained import load_pretrained, missing_weights_message, quiet_random_init, random_weights_warning
    from .tiny_clip import create_tiny_clip

    if pretrained is not None and not os.path.exists(pretrained):
        raise FileNotFoundError(missing_weights_message(pretrained))
    if model != "tiny" and model not in open_clip.list_models():
        raise ValueError(f"unknown model {model!r}; use 'tiny' or an open_clip name such as 'ViT-B-16'")
    with quiet_random_init():  # the weights are loaded below, or random on purpose (tiny)
        clip = create_tiny_clip(seed=0) if model == "tiny" else open_clip.create_model(model, pretrained=None)
    if pretrained is not None:
        load_pretrained(clip, pretrained)
    elif model != "tiny":
        print(random_weights_warning(model), file=sys.stderr, flush=True)
    return clip.to(device)


def image_size_of(clip) -> int:
    size = clip.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def data_root(cfg: TrainConfig) -> str:
    """The folder the run's data lives in: ``dataset_dir`` for a dataset of your own, else ``root``."""
    return cfg.dataset_dir if cfg.own_dataset else cfg.root


def own_dataset_spec(cfg: TrainConfig):
    """The :class:`~drople_fast.training.data.catalog.CustomDataset` of ``cfg``, or None for a known dataset."""
    from .data.catalog import CustomDataset, find_split_file

    if not cfg.own_dataset:
        return None
    split = cfg.split_file if cfg.split_file is not None else find_split_file(cfg.dataset_dir)
    return CustomDataset(cfg.dataset, cfg.dataset_dir, split, cfg.image_dir, cfg.template)


def fewshot_cache_dir(cfg: TrainConfig) -> Optional[str]:
    """Where few-shot samples are cached: ``--fewshot-cache``, else ``<root>/split_fewshot`` (``<dataset_dir>/
    split_fewshot`` for a dataset of your own), else (a read-only folder)
    ``$XDG_CACHE_HOME/drople_fast/split_fewshot`` (logged); None if nothing is writable."""
    if cfg.fewshot_cache is not None:
        return cfg.fewshot_cache
    cache = os.path.join(data_root(cfg), "split_fewshot")
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
    from .data.catalog import custom_dataset

    spec = own_dataset_spec(cfg)
    cache = fewshot_cache_dir(cfg)
    with custom_dataset(spec):
        plan = build_plan(cfg.protocol, cfg.dataset, cfg.root, cfg.shots, cfg.seed, cache_dir=cache,
                          targets=cfg.targets, imbalance=cfg.imbalance, allow_fewer=cfg.allow_fewer)
    check_plan_images(plan)
    return plan


# Header-parsing an image costs about one file open; past this many the check would take seconds, so
# a full-data ImageNet run checks nothing up front (an unreadable image is still named when it is read).
READABLE_CHECK_LIMIT = 50_000


def check_plan_images(plan: Plan) -> None:
    """The readers check that every image exists; here the images of the run must also decode: the
    training ones, and the evaluation ones too when all of them together are few enough."""
    from .data.datasets import check_readable

    evals = [r for split in plan.evals for r in split.records]
    if len(plan.train_records) + len(evals) <= READABLE_CHECK_LIMIT:
        check_readable(list(plan.train_records) + evals)
    elif len(plan.train_records) <= READABLE_CHECK_LIMIT:
        check_readable(plan.train_records)


def make_learner(cfg: TrainConfig, clip, classnames: Sequence[str], rank: int = 0):
    from .learner import DroPLe

    iwtd = dataclasses.replace(cfg.iwtd, seed=derive_seed(cfg.iwtd.seed, cfg.seed, rank))
    apply(clip, iwtd)
    return DroPLe(clip, classnames, n_ctx=cfg.n_ctx, text_depth=cfg.text_depth, vision_depth=cfg.vision_depth,
                  lora_rank=cfg.lora_rank, dataset=_dataset_of(cfg), templates=teacher_templates(cfg),
                  descriptions=cfg.descriptions, loss_weights=cfg.loss_weights)


def _dataset_of(cfg: TrainConfig) -> str:
    from .data import canonical_name

    return cfg.dataset if cfg.own_dataset else canonical_name(cfg.dataset)


def teacher_templates(cfg: TrainConfig) -> Optional[list]:
    """The teacher's templates: None (the learner's default: the known dataset's CoOp template, then the
    ensemble) unless ``cfg.template`` is set or the dataset is your own ("a photo of a {}." by default:
    a known dataset's template never applies to your data, even under its name)."""
    from .data.catalog import DEFAULT_TEMPLATE
    from .learner import DEFAULT_TEMPLATES

    if cfg.template is None and not cfg.own_dataset:
        return None
    first = cfg.template or DEFAULT_TEMPLATE
    return [first] + [t for t in DEFAULT_TEMPLATES if t != first]


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
                                         worker_init_fn=worker_init, persistent_workers=False)
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
