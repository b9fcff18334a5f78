"""``BENCH_SMOKE=1``: every benchmark at a tiny size, one round, so CI can prove that bench/ still runs
(tests/test_bench_smoke.py). Timings taken under it mean nothing; nothing under it is ever reported.

The benchmarks import their sizes from here, so a smoke run goes through the same code as a real one.
"""
from __future__ import annotations

import os

from drople_fast.ops.testing import VIT_B16_LAYER

SMOKE = os.environ.get("BENCH_SMOKE") == "1"

# One IWTD layer: ViT-B/16's vision layer at batch 32, or a 2-sample, 17-token layer.
IWTD_LAYER = VIT_B16_LAYER.with_(B=2, H=4, S=17, Dh=16, D=64, M=8, P=32) if SMOKE else VIT_B16_LAYER


def env_int(name: str, default: int, smoke: int) -> int:
    """``$name`` if set, else ``smoke`` under BENCH_SMOKE, else ``default``."""
    return int(os.environ.get(name, smoke if SMOKE else default))


def vit_b16(device="cpu"):
    """The benchmarks' CLIP: open_clip ViT-B/16 with random weights (the weights do not change a step's
    cost), or under BENCH_SMOKE a 12-layer, width-64 CLIP at the same 224-px input with 32-px patches
    (12 layers, so the release's layer lists apply unchanged)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    if not SMOKE:
        return open_clip.create_model("ViT-B-16", pretrained=None).to(device)
    from drople_fast.training.tiny_clip import register_config

    register_config("bench-smoke", {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 64, "patch_size": 32, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 12},
    })
    return open_clip.create_model("bench-smoke", pretrained=None).to(device)
