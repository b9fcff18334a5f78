"""Device-to-host syncs in the training forward: at most one per IWTD layer in "drop", none in "drop_fixed".

Counted on the CPU with a wrapper around every Python-level sync point of torch
(``item``, ``tolist``, ``int()``/``bool()``/``float()``/``index`` of a tensor,
``nonzero``): each is a stall of the device queue on CUDA. ``nonzero_static`` and
``torch._assert_async`` are not sync points and are not counted.
"""
from __future__ import annotations

import collections
import contextlib
import traceback

import pytest
import torch

import drople_fast as df
from drople_fast.training.learner import DroPLe
from drople_fast.training.tiny_clip import create_tiny_clip

CLASSES = ["red circle", "blue square", "green cross"]
VISION_LAYERS, TEXT_LAYERS = 6, 9  # the release's IWTD layers


class SyncCounter:
    """Counts calls of torch's sync points (with where they came from, for the failure message)."""

    METHODS = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__", "nonzero")

    def __init__(self):
        self.where = collections.Counter()

    @property
    def count(self) -> int:
        return sum(self.where.values())

    @contextlib.contextmanager
    def counting(self, monkeypatch):
        def wrap(name, fn):
            def counted(*args, **kwargs):
                frame = traceback.extract_stack(limit=2)[0]
                self.where[f"{name} at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"] += 1
                return fn(*args, **kwargs)
            return counted

        with monkeypatch.context() as m:
            for name in self.METHODS:
                m.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
            m.setattr(torch, "nonzero", wrap("torch.nonzero", torch.nonzero))
            yield self


def _learner(mode: str, backend: str = "reference"):
    clip = create_tiny_clip(seed=0)
    torch.manual_seed(1)
    return DroPLe(clip, CLASSES, iwtd=df.IWTDConfig(mode=mode, backend=backend)).train()


def test_counter_sees_syncs(monkeypatch):
    counter = SyncCounter()
    with counter.counting(monkeypatch):
        t = torch.arange(5)
        int(t.max()), t.nonzero(), t.tolist()
        torch.nonzero_static(t, size=4)
    assert counter.count == 3, counter.where


@pytest.mark.parametrize("mode, vision_limit, text_limit", [
    # drop: one read per layer (new width + real-row count together). The text tower reads once per
    # forward before its blocks (the longest prompt for EOS trimming, and the real-token count) and at
    # its last IWTD layer only: at the others the next layer replaces every eligible token (its prompts),
    # so nothing is drawn and the prompts come out with no read (the learner's depth, 9, = its IWTD layers).
    ("drop", VISION_LAYERS, 2),
    # drop_fixed: static shapes, nothing read per layer (the text tower's one EOS read per forward remains).
    ("drop_fixed", 0, 1),
    ("perturb", 0, 1),
    ("off", 0, 1),
])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_syncs_per_forward(monkeypatch, mode, vision_limit, text_limit, backend):
    if backend == "reference" and mode == "perturb":
        pytest.skip("the reference noise op (the oracle) selects rows with nonzero; the fused ops do not")
    learner = _learner(mode, backend)
    x = torch.randn(2, 3, 32, 32)
    learner.image_features(x)  # warm-up (lazy imports, registrations)
    for tower, run, limit in (("vision", lambda: learner.image_features(x), vision_limit),
                              ("text", learner.text_features, text_limit)):
        counter = SyncCounter()
        with counter.counting(monkeypatch):
            run()
        assert counter.count <= limit, (tower, dict(counter.where))
    if mode == "drop":  # the bound is tight: something was dropped, so each layer did read its width
        assert counter.count == text_limit, dict(counter.where)
