"""The frozen teacher's image features, computed once per training image.

With the release's augmentation the teacher sees the clean image, i.e. the evaluation
preprocessing of the training image (release/data/meta_dataset.py:70-92, 201-208;
release/models/drople.py:840-843), and the teacher is frozen, so its image features are a function
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
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Callable, ContextManager, Dict, Optional, Sequence

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


@torch.no_grad()
def compute_teacher_features(learner, paths: Sequence[str], image_size: int, device: torch.device, chunk: int,
                             autocast: Callable[[], ContextManager], num_workers: int = 0) -> torch.Tensor:
    """(N, E) float32 teacher features of the clean views, on the CPU, in chunks of exactly ``chunk``
    images (the last one padded; see the module docstring)."""
    from .data import ImageDataset, Record, eval_transform

    dataset = ImageDataset([Record(p, 0, "") for p in paths], eval_transform(image_size))
    # a private generator: building the cache must not move the global RNG the training run draws from
    loader = torch.utils.data.DataLoader(dataset, batch_size=chunk, shuffle=False, num_workers=num_workers,
                                         generator=torch.Generator().manual_seed(0))
    out = []
    for images, _ in loader:
        n = images.shape[0]
        if n < chunk:
            images = torch.cat([images, images[-1:].expand(chunk - n, *images.shape[1:])])
        with autocast():
            out.append(learner.teacher_image_features(images.to(device))[:n].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def build_teacher_cache(learner, paths: Sequence[str], image_size: int, device: torch.device, chunk: int,
                        autocast: Callable[[], ContextManager], cache_dir: Optional[str] = None,
                        num_workers: int = 0, write: bool = True) -> TeacherImageCache:
    """The teacher features of ``paths`` (training order): read from ``cache_dir`` if a valid file
    for this key is there, else computed (and written there when ``write``)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    with autocast():
        key = cache_key(learner.clip, paths, image_size, device, chunk)
    path = os.path.join(cache_dir, FOLDER, key[:32] + ".pt") if cache_dir else None
    if path is not None and os.path.isfile(path):
        try:
            return TeacherImageCache(_read(path, key, len(paths)).to(device), key, source=path)
        except ValueError as exc:
            print(f"drople-fast: teacher feature cache {path} {exc}; recomputing it", file=sys.stderr)
    feats = compute_teacher_features(learner, paths, image_size, device, chunk, autocast, num_workers)
    if path is not None and write:
        payload = {"format": FORMAT, "key": key, "features": feats, "sha256": _features_digest(feats)}
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, lambda buf: torch.save(payload, buf))
        except OSError as exc:  # a cache: failing to keep it only costs the recomputation next time
            print(f"drople-fast: could not write the teacher feature cache {path}: {exc}", file=sys.stderr)
    return TeacherImageCache(feats.to(device), key)
