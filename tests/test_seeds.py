"""The random-stream layout (drople_fast/clip/seeds.py): whole 64-bit seed, collision-free keys."""
from __future__ import annotations

import itertools

import pytest
import torch

import drople_fast as df
from drople_fast.clip import patch as patch_module
from drople_fast.clip import seeds
from drople_fast.ops.philox import PURPOSES, token_uniform
from drople_fast.training.tiny_clip import create_tiny_clip

import patch_reference as R

DEEP = 48  # deeper than 32 IWTD layers: the old "+2*layer within a stride of 64" reused streams here


def test_keys_are_distinct_over_steps_towers_layers_and_purposes():
    for seed in (0, 1, 2**31, 2**32, 2**63 - 1, 2**64 - 1, -1):
        keys = {}
        for step, tower, layer, purpose in itertools.product(range(1, 5), seeds.TOWERS, range(DEEP), PURPOSES):
            key = seeds.stream_key(seed, step, tower, layer, purpose)
            assert -(2**63) <= key < 2**63
            assert key not in keys, (seed, (step, tower, layer, purpose), keys.get(key))
            keys[key] = (step, tower, layer, purpose)


def test_whole_64_bit_seed_is_used():
    keys = [seeds.stream_key(s, 1, "vision", 0) for s in (0, 2**31, 2**32, 2**63, 2**64 - 1)]
    assert len(set(keys)) == len(keys)
    draws = [token_uniform(k, 2, 16) for k in keys]
    for a, b in itertools.combinations(draws, 2):
        assert not torch.equal(a, b)


def test_tensor_step_matches_int_step():
    for step in (1, 7, 2**40):
        t = seeds.step_key(5, torch.tensor(step), "text")
        assert int(t) == seeds.step_key(5, step, "text")
        assert int(seeds.layer_key(t, 33)) == seeds.layer_key(seeds.step_key(5, step, "text"), 33)


@pytest.mark.parametrize("bad", [True, 1.5, "3", 2**64, -(2**63) - 1])
def test_bad_seed_is_refused(bad):
    with pytest.raises(ValueError, match="seed"):
        df.IWTDConfig(seed=bad)


def test_bad_layer_and_step_are_refused():
    with pytest.raises(ValueError, match="layer"):
        seeds.layer_key(0, seeds.MAX_LAYERS)
    with pytest.raises(ValueError, match="step"):
        seeds.step_key(0, -1, "vision")
    with pytest.raises(ValueError, match="tower"):
        seeds.step_key(0, 1, "audio")


def test_deep_tower_streams_never_coincide(monkeypatch):
    """A 48-layer tiny CLIP with IWTD after every block: every (step, tower, layer) key is distinct
    and is exactly the documented layout (transcribed independently in tests/patch_reference.py)."""
    model = create_tiny_clip(seed=0, vision_cfg={"layers": DEEP, "width": 16, "head_width": 8},
                             text_cfg={"layers": DEEP, "width": 16, "heads": 2})
    config = df.IWTDConfig(mode="perturb", vision_layers=range(DEEP), text_layers=range(DEEP), seed=2**32 + 7,
                           bridge_tokens=2, bridge_dim=4)
    df.apply(model, config)
    seen = []
    real_iwtd = patch_module.iwtd

    def recording(*args, **kwargs):
        seen.append(int(kwargs["seed"]))
        return real_iwtd(*args, **kwargs)

    monkeypatch.setattr(patch_module, "iwtd", recording)
    model.train()
    images = torch.randn(1, 3, 32, 32)
    text = R.make_text([5])
    expected = []
    with torch.no_grad():
        for step in range(1, 4):
            model.encode_image(images)
            model.encode_text(text)
            for tower in ("vision", "text"):
                first = R.forward_seed(config.seed, step, tower)
                expected += [R.layer_seed_of(first, layer) for layer in range(DEEP)]
    assert seen == expected
    assert len(set(seen)) == len(seen) == 3 * 2 * DEEP


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_keys_with_the_top_bit_set_draw_the_same_mask_on_every_backend(backend):
    """Keys are full 64-bit values (purpose in the top bits): every backend must read both key words."""
    from drople_fast.ops.backends import select_backend
    from iwtd_harness import Case, assert_matches_reference, make_inputs

    try:
        select_backend(backend, torch.device("cpu"), torch.float32)
    except (ValueError, RuntimeError) as exc:
        pytest.skip(f"{backend} unavailable: {exc}")
    key = next(k for k in (seeds.stream_key(s, 3, "text", 40, "noise") for s in range(64)) if k < 0)
    assert_matches_reference(make_inputs(Case(2, 2, 9, seed=key)), backend)


def test_run_seeds_of_a_sweep_are_distinct():
    # base + 1000 * seed + rank made (base 1000, seed 0) and (base 0, seed 1) share every stream
    assert seeds.derive_seed(1000, 0, 0) != seeds.derive_seed(0, 1, 0)
    got = {seeds.derive_seed(b, s, r) for b in range(3) for s in range(1, 4) for r in range(4)}
    assert len(got) == 3 * 3 * 4
