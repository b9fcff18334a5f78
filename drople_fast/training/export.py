"""Prompts-only export: what a trained run adds to CLIP, in one safetensors file, and the call that
turns it back into a ready-to-evaluate learner.

The file holds the learner's trainable tensors (``learner.*``: text and vision prompts, logit scale,
LoRA factors; :meth:`DroPLe.prompt_state_dict`), the IWTD bridge (``bridge.*``) and, as safetensors
metadata (strings), the run's TrainConfig and training class names. No CLIP weight is in it: the
CLIP comes from the same local weights the run trained on (``clip_weights``), so a ViT-B/16 export
is a few MB instead of the CLIP's 600.

``drople-fast export RUN --out prompts.safetensors`` writes it from a run directory's checkpoint;
:func:`load_prompts` reads it back::

    learner = load_prompts("prompts.safetensors", clip_weights="ViT-B-16.pt")
    logits = learner(images)                     # (B, C) over the training classes
    learner.set_classnames(["otter", "heron"])   # or any others
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Optional, Sequence, Tuple

import torch

FORMAT = "drople_fast-prompts-v1"
LEARNER_PREFIX, BRIDGE_PREFIX = "learner.", "bridge."


def save_prompts(path: str, learner_state: Dict[str, torch.Tensor], bridge_state: Dict[str, torch.Tensor],
                 config, classnames: Sequence[str]) -> int:
    """Write the export file atomically; returns its size in bytes. ``config``: a TrainConfig or its dict."""
    from safetensors.torch import save

    from .. import __version__
    from .fileio import atomic_write_bytes

    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    tensors = {LEARNER_PREFIX + k: v.detach().cpu().contiguous().clone() for k, v in learner_state.items()}
    tensors.update({BRIDGE_PREFIX + k: v.detach().cpu().contiguous().clone() for k, v in bridge_state.items()})
    metadata = {"format": FORMAT, "drople_fast": __version__, "config": json.dumps(cfg, sort_keys=True),
                "classnames": json.dumps(list(classnames))}
    blob = save(tensors, metadata=metadata)
    atomic_write_bytes(path, blob)
    return len(blob)


def export_run(run: str, out: str) -> int:
    """Export the run directory ``run`` (or a checkpoint file) to ``out``; returns the file's size."""
    from .run_dir import CHECKPOINT, load_checkpoint

    path = os.path.join(run, CHECKPOINT) if os.path.isdir(run) else run
    ckpt = load_checkpoint(path)
    classnames = ckpt.get("classnames")
    if classnames is None:  # checkpoints written before they held the class names: read the data
        from .build import make_plan
        from .config import TrainConfig

        classnames = make_plan(TrainConfig.from_dict(ckpt["config"])).train_classnames
    return save_prompts(out, ckpt["learner"], ckpt["patch"]["bridge"], ckpt["config"], classnames)


def read_prompts(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict, list]:
    """(learner tensors, bridge tensors, config dict, class names) of an export file; a file that is not
    one is a ValueError naming it."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a drople_fast prompts export (format {metadata.get('format')!r}, "
                         f"expected {FORMAT!r}; write one with `drople-fast export RUN --out FILE`)")
    try:
        config, classnames = json.loads(metadata["config"]), json.loads(metadata["classnames"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: damaged metadata ({exc})") from exc
    learner = {k[len(LEARNER_PREFIX):]: v for k, v in tensors.items() if k.startswith(LEARNER_PREFIX)}
    bridge = {k[len(BRIDGE_PREFIX):]: v for k, v in tensors.items() if k.startswith(BRIDGE_PREFIX)}
    return learner, bridge, config, classnames


def load_prompts(path: str, clip_weights: Optional[str] = None, device: str = "cpu",
                 classnames: Optional[Sequence[str]] = None):
    """A :class:`~drople_fast.training.learner.DroPLe` in eval mode from the export ``path`` and the local
    CLIP weights ``clip_weights`` (a file or folder :func:`~drople_fast.training.pretrained.load_pretrained`
    reads; None: the run's own ``--pretrained`` path when it exists here, and for the test-sized ``tiny``
    model its seeded random weights). Its logits are over the training classes, or ``classnames`` when given."""
    from ..clip.patch import get_state
    from .build import build_clip, make_learner, resolve_device
    from .config import TrainConfig

    learner_state, bridge_state, config, trained_on = read_prompts(path)
    try:
        cfg = TrainConfig.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: its config is not valid here ({exc})") from None
    # the teacher's class descriptions only shape training losses; the file may not exist here
    cfg = dataclasses.replace(cfg, descriptions=None)
    if clip_weights is None and cfg.pretrained is not None:
        if not os.path.exists(cfg.pretrained):
            raise FileNotFoundError(f"{path} was trained on the CLIP weights {cfg.pretrained}, not found here; "
                                    "pass clip_weights= (the same weights, a local file or folder)")
        clip_weights = cfg.pretrained
    dev = resolve_device(device)
    clip = build_clip(cfg.model, clip_weights, dev)
    learner = make_learner(cfg, clip, list(trained_on)).to(dev)
    learner.load_prompt_state_dict(learner_state, path)
    bridge = get_state(clip).bridge
    try:
        bridge.load_state_dict(bridge_state)
    except RuntimeError as exc:
        raise ValueError(f"{path}: its bridge does not match the model ({exc})".splitlines()[0]) from None
    if classnames is not None:
        learner.set_classnames(classnames)
    return learner.eval()
