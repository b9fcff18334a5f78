"""Small open_clip model configs for tests, the demo and benchmarks (no weights needed)."""
from __future__ import annotations

import copy

import torch

# Twelve layers like ViT-B/16, so the release's layer lists (vision 0-5, text 0-8) apply unchanged.
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 12, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 12},
}
TINY_NAME = "drople-tiny"


def register_config(name: str, config: dict) -> None:
    """Make ``open_clip.create_model(name)`` know ``config`` (idempotent)."""
    from open_clip import factory

    factory._MODEL_CONFIGS[name] = copy.deepcopy(config)


def create_tiny_clip(seed: int = 0, **overrides):
    """A randomly initialised 12-layer CLIP with width 64 (vision 32 px, patch 8 -> 17 tokens)."""
    import open_clip

    config = copy.deepcopy(TINY_CONFIG)
    for tower in ("vision_cfg", "text_cfg"):
        config[tower].update(overrides.pop(tower, {}))
    config.update(overrides)
    name = TINY_NAME if config == TINY_CONFIG else f"{TINY_NAME}-{abs(hash(repr(sorted(config.items()))))}"
    register_config(name, config)
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None)
