"""The demo's pieces (drople_fast/training/demo.py): its table, its data, its toy CLIP, and the small-image
guard of the per-patch augmentation. The demo's learning is tested in tests/test_learning.py."""
import warnings

import numpy as np
import pytest
import torch

from drople_fast.training import demo
from drople_fast.training.data import patch_augment
from drople_fast.training.data.patch_augment import PatchRandAugment, SmallPatchGridWarning, check_patch_grid
from drople_fast.training.data.synthetic import DOMAINS, class_names, render_image


def _metrics(base, novel, hm, zs=(50.0, 40.0, 44.44), epochs=2, train_time=3.0):
    return {"base_acc": base, "novel_acc": novel, "hm": hm, "zs_base_acc": zs[0], "zs_novel_acc": zs[1],
            "zs_hm": zs[2], "info": {"epochs": epochs, "train_time_s": train_time}}


def test_table_has_the_four_methods_and_seconds_per_epoch():
    results = [(label, _metrics(60.0 + i, 45.0, 51.4 + i, train_time=2.0 * (i + 1)))
               for i, (label, _, _) in enumerate(demo.METHODS)]
    rows = demo.table_rows(results)
    assert [r["method"] for r in rows] == [demo.ZERO_SHOT] + [m[0] for m in demo.METHODS]
    assert rows[0]["base_acc"] == 50.0 and rows[0]["s_per_epoch"] is None
    assert [r["s_per_epoch"] for r in rows[1:]] == [1.0, 2.0, 3.0]
    text = demo.format_table(rows)
    assert text.splitlines()[0] == "| Method | Base | Novel | HM | s per epoch |"
    assert "| DroPLe (drop, ours) | 62.00 | 45.00 | 53.40 | 3.0 |" in text


def test_table_refuses_runs_whose_zero_shot_differs():
    results = [("a", _metrics(60, 45, 51)), ("b", _metrics(60, 45, 51, zs=(51.0, 40.0, 44.9)))]
    with pytest.raises(RuntimeError, match="zero-shot accuracy differs between runs"):
        demo.table_rows(results)


def test_plain_prompt_learning_is_ce_only_and_the_drople_rows_are_the_release_losses():
    (_, off_mode, ce), (_, p_mode, p_w), (_, d_mode, d_w) = demo.METHODS
    assert (off_mode, p_mode, d_mode) == ("off", "perturb", "drop")
    assert ce.ce == 1.0 and ce.text_l1 == ce.image_l1 == ce.kl == ce.entropy == ce.align == 0.0
    assert p_w == d_w == demo.LossWeights()


def test_web_images_are_their_own_stream_and_domains_differ():
    names = class_names(4)
    a, la = demo.web_images(names, 2, 64, seed=0)
    b, _ = demo.web_images(names, 2, 64, seed=0)
    assert a.shape == (8, 3, 64, 64) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert la.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    # the downstream dataset draws from numpy seed 0 directly; the web stream is offset from it
    down = render_image(names[0], 64, np.random.default_rng(0), "web")
    assert not np.array_equal(a[0].permute(1, 2, 0).numpy(), down)
    # the downstream domain is shot differently (colour cast, brighter background)
    web = np.stack([render_image("white checkers", 64, np.random.default_rng(s), "web") for s in range(8)])
    dst = np.stack([render_image("white checkers", 64, np.random.default_rng(s), "downstream") for s in range(8)])
    assert dst.mean() > web.mean() + 20
    assert dst[..., 0].mean() - dst[..., 2].mean() > 40 > abs(web[..., 0].mean() - web[..., 2].mean())
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        render_image("red circle", 16, np.random.default_rng(0), "studio")
    assert set(DOMAINS) == {"plain", "web", "downstream"}


def test_toy_clip_takes_the_real_input_with_about_fifty_tokens():
    from drople_fast.training.tiny_clip import TINY_224_CONFIG, TINY_224_NAME, create_tiny_clip

    import open_clip

    assert TINY_224_NAME in open_clip.list_models()
    model = create_tiny_clip(base=TINY_224_CONFIG)
    assert tuple(model.visual.image_size) == (224, 224)
    assert model.visual.positional_embedding.shape[0] == 50  # 7 x 7 patches + CLS
    assert len(model.visual.transformer.resblocks) == 12  # the release's layer lists apply unchanged


def test_patch_augment_warns_once_below_an_8x8_grid(monkeypatch):
    monkeypatch.setattr(patch_augment, "_warned", set())
    aug = PatchRandAugment()
    small = torch.zeros(3, 32, 32, dtype=torch.uint8)
    with pytest.warns(SmallPatchGridWarning, match=r"sees 2x2 patches of 16 px.*at least 128 px.*augment none"):
        aug(small)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aug(small)  # once per size and process
        aug(torch.zeros(3, 224, 224, dtype=torch.uint8))  # 14 x 14: as at full scale, silent
        aug(torch.zeros(3, 128, 128, dtype=torch.uint8))  # 8 x 8: the threshold, silent
    assert check_patch_grid(128, 128) and check_patch_grid(224, 224)
    with pytest.warns(SmallPatchGridWarning, match="sees 7x14 patches"):
        assert not check_patch_grid(127, 224)
