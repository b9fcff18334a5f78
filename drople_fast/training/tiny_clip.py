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

# The demo's CLIP: the real input (224 px, CLIP's preprocessing) through a patch-32 ViT, 7 x 7 patches + CLS
# = 50 tokens, so the release's 16-px per-patch augmentation sees 14 x 14 patches as at full scale; width
# and depth stay tiny so that a CPU trains it in minutes. An open_clip name once this module is imported
# (TrainConfig(model=TINY_224_NAME); the trainer imports it).
TINY_224_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 64, "patch_size": 32, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 12},
}
TINY_224_NAME = "drople-tiny-224"


def register_config(name: str, config: dict) -> None:
    """Make ``open_clip.create_model(name)`` know ``config`` (idempotent)."""
    from open_clip import factory

    factory._MODEL_CONFIGS[name] = copy.deepcopy(config)


def create_tiny_clip(seed: int = 0, base: dict = TINY_CONFIG, **overrides):
    """A randomly initialised 12-layer CLIP with width 64 (``base``: :data:`TINY_CONFIG`, vision 32 px,
    patch 8 -> 17 tokens; or :data:`TINY_224_CONFIG`, 224 px, patch 32 -> 50 tokens)."""
    import open_clip

    config = copy.deepcopy(base)
    for tower in ("vision_cfg", "text_cfg"):
        config[tower].update(overrides.pop(tower, {}))
    config.update(overrides)
    if config == TINY_CONFIG:
        name = TINY_NAME
    elif config == TINY_224_CONFIG:
        name = TINY_224_NAME
    else:
        name = f"{TINY_NAME}-{abs(hash(repr(sorted(config.items()))))}"
    register_config(name, config)
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None)


register_config(TINY_224_NAME, TINY_224_CONFIG)
