"""The frozen teacher's image features, computed once per training image.

With the release's augmentation the teacher sees the clean image, i.e. the evaluation
preprocessing of the training image (release/data/meta_dataset.py:70-92, 201-208;
release/models/drople.py:848-851), and the teacher is frozen, so its image features are a function
of (teacher weights, preprocessing, image) alone. :func:`build_teacher_cache` computes them once
for the whole training list (before the first epoch) and the train loop looks them up by the
dataset index instead of running the teacher's image forward every step.

Bit-identity with running the teacher every step: CPU/GPU matrix products give a row results
that depend on the number of rows (the kernel and blocking are chosen by shape) but not on the
other rows' values or the row's position. The cache therefore runs the teacher on chunks of
exactly the training batch size (the last chunk padded by repeating its last image, the padding
discarded), so every feature is the one a training step of that batch size computes; a run with
and without the cache is bitwise the same whenever every training batch is full (``drop_last``,
which the trainer uses whenever the data allows).

The file cache (``<few-shot cache>/teacher_features/<key>.pt``) is keyed by a SHA-256 over
the teacher's vision weights (every tensor of ``clip.visual``), the preprocessing (image size,
interpolation, normalisation, torchvision and PIL versions), the computation (device type,
autocast state, chunk size, torch and drople_fast versions) and the images (path, size, mtime in
ns, in order); a file is never served for another key. It is written atomically
(:mod:`drople_fast.training.fileio`) and holds the SHA-256 of its feature bytes; a file that does
not load, has another key or shape, or fails its checksum is reported, recomputed and replaced.

Precision: the features are computed under the autocast the training step uses (the trainer
passes its own autocast context, and the autocast dtype is part of the key) and kept as the
float32 unit vectors :meth:`DroPLe.teacher_image_features` returns, i.e. exactly what the teacher
gives inside a (bf16) training step of the same batch size.

DDP: the distributed sampler deals the images out to the ranks anew every epoch, so every rank
holds the whole (N, E) table; each rank computes every ``world``-th chunk and an all-gather
shares them (or every rank reads the same valid file). Resume: the table is rebuilt (from the
file when it is valid) and never checkpointed; building it draws nothing from the global RNG or
the training loader's generator, so a resumed run's random draws are unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Callable, ContextManager, Dict, List, Optional, Sequence

import torch

from .fileio import atomic_write

FORMAT = 1
FOLDER = "teacher_features"


class TeacherImageCache:
    """(N, E) unit-normalised teacher image features; row i belongs to training record i."""

    def __init__(self, features: torch.Tensor, key: str, source: str = "computed"):
        self.features, self.key, self.source = features, key, source

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return self.features[index.to(self.features.device)]


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``module``'s state dict (sorted by name)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach()
        h.update(f"{name}\x1f{t.dtype}\x1f{tuple(t.shape)}\x1e".encode())
        h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def images_digest(paths: Sequence[str]) -> str:
    """SHA-256 over each image's absolute path, size and modification time (ns), in order."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\x1f{st.st_size}\x1f{st.st_mtime_ns}\x1e".encode())
    return h.hexdigest()


def preprocessing_id(image_size: int) -> Dict:
    """What the clean view depends on (:func:`drople_fast.training.data.eval_transform`)."""
    import PIL
    import torchvision

    from .data.transforms import CLIP_MEAN, CLIP_STD

    return {"view": "resize_short_side+center_crop", "image_size": int(image_size), "interpolation": "bicubic",
            "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "torchvision": torchvision.__version__,
            "PIL": PIL.__version__}


def _autocast_id(device: torch.device) -> Optional[str]:
    """The autocast dtype in force for ``device`` (None if off): it changes the features."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return str(torch.get_autocast_dtype(device.type))


def cache_key(clip: torch.nn.Module, paths: Sequence[str], image_size: int, device: torch.device,
              chunk: int) -> str:
    from .. import __version__

    ident = {"format": FORMAT, "weights": weights_digest(clip.visual), "preprocessing": preprocessing_id(image_size),
             "compute": {"device": device.type, "autocast": _autocast_id(device), "chunk": int(chunk),
                         "torch": torch.__version__, "drople_fast": __version__},
             "images": images_digest(paths), "count": len(paths)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _features_digest(features: torch.Tensor) -> str:
    return hashlib.sha256(features.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _read(path: str, key: str, count: int) -> torch.Tensor:
    """The features stored at ``path``; ValueError says why they cannot be used."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises several types on damaged files
        raise ValueError(f"does not load ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError("is not a teacher feature cache of this format")
    if payload.get("key") != key:
        raise ValueError("belongs to other weights, preprocessing or images")
    feats = payload.get("features")
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != count \
            or feats.dtype != torch.float32:
        raise ValueError(f"holds features of the wrong shape or type for {count} images")
    if payload.get("sha256") != _features_digest(feats):
        raise ValueError("fails its checksum (damaged)")
    return feats


def _chunks(n: int, chunk: int, world: int, rank: int) -> List[List[int]]:
    """The record indices of the chunks ``rank`` computes: chunk k holds records
    ``[k * chunk, (k + 1) * chunk)`` and belongs to rank ``k % world``."""
    return [list(range(k * chunk, min(n, (k + 1) * chunk))) for k in range(rank, -(-n // chunk), world)]


@torch.no_grad()
def compute_teacher_features(learner, paths: Sequence[str], image_size: int, device: torch.device, chunk: int,
                             autocast: Callable[[], ContextManager], num_workers: int = 0, world: int = 1,
                             rank: int = 0) -> torch.Tensor:
    """(N, E) float32 teacher features of the clean views on ``device``, computed in chunks of
    exactly ``chunk`` images (the last one padded by repeating its last image; see the module
    docstring). Under DDP (``world`` > 1, a process group initialised) each rank computes every
    ``world``-th chunk and an all-gather gives every rank the whole table."""
    from .data import ImageDataset, Record, eval_transform

    n = len(paths)
    dim = int(learner.clip.visual.output_dim)
    mine = _chunks(n, chunk, world, rank)
    # each chunk padded to ``chunk`` images, so every loader batch is one chunk of the training batch shape
    padded = [i for c in mine for i in c + [c[-1]] * (chunk - len(c))]
    dataset = ImageDataset([Record(paths[i], 0, "") for i in padded], eval_transform(image_size))
    # a private generator: building the cache must not move the global RNG the training run draws from
    loader = torch.utils.data.DataLoader(dataset, batch_size=chunk, shuffle=False, num_workers=num_workers,
                                         generator=torch.Generator().manual_seed(0))
    # every rank sends the same number of chunks to the all-gather: ceil(chunks / world)
    per_rank = -(-(-(-n // chunk)) // world)
    local = torch.zeros(per_rank, chunk, dim, dtype=torch.float32, device=device)
    for j, (images, _) in enumerate(loader):
        with autocast():
            local[j] = learner.teacher_image_features(images.to(device)).float()
    if world == 1:
        parts = [local]
    else:
        import torch.distributed as dist

        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
    out = torch.empty(n, dim, dtype=torch.float32, device=device)
    for k in range(-(-n // chunk)):
        rows = min(n, (k + 1) * chunk) - k * chunk
        out[k * chunk:k * chunk + rows] = parts[k % world][k // world, :rows]
    return out


def _agree(ok: bool, device: torch.device, world: int) -> bool:
    """True when ``ok`` on every rank (an all-reduce; the plain value without DDP)."""
    if world == 1:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def build_teacher_cache(learner, paths: Sequence[str], image_size: int, device: torch.device, chunk: int,
                        autocast: Callable[[], ContextManager], cache_dir: Optional[str] = None,
                        num_workers: int = 0, world: int = 1, rank: int = 0) -> TeacherImageCache:
    """The teacher features of ``paths`` (training order): read from ``cache_dir`` if a valid file
    for this key is there (on every rank, under DDP), else computed (shared out over the ranks) and
    written there by rank 0."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    with autocast():
        key = cache_key(learner.clip, paths, image_size, device, chunk)
    path = os.path.join(cache_dir, FOLDER, key[:32] + ".pt") if cache_dir else None
    feats = None
    if path is not None and os.path.isfile(path):
        try:
            feats = _read(path, key, len(paths)).to(device)
        except ValueError as exc:
            print(f"drople-fast: teacher feature cache {path} {exc}; recomputing it", file=sys.stderr)
    if _agree(feats is not None, device, world):
        return TeacherImageCache(feats, key, source=path)
    feats = compute_teacher_features(learner, paths, image_size, device, chunk, autocast, num_workers, world, rank)
    if path is not None and rank == 0:
        cpu = feats.cpu()
        payload = {"format": FORMAT, "key": key, "features": cpu, "sha256": _features_digest(cpu)}
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, lambda buf: torch.save(payload, buf))
        except OSError as exc:  # a cache: failing to keep it only costs the recomputation next time
            print(f"drople-fast: could not write the teacher feature cache {path}: {exc}", file=sys.stderr)
    return TeacherImageCache(feats, key)
