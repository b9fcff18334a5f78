"""Each DroPLe loss term against a hand computation with plain Python loops."""
import math

import pytest
import torch

from drople_fast.training.losses import (
    LossWeights,
    alignment_loss,
    drople_loss,
    js_alignment,
    kl_to_frozen,
    residual_entropy,
    residual_lambda,
)

# ---------------------------------------------------------------- hand helpers


def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def entropy(row):
    return -sum(p * math.log(p) for p in softmax(row) if p > 0)


def mean(xs):
    return sum(xs) / len(xs)


def rows(t):
    return t.double().tolist()


def hand_entropies(img_f, img_d, txt_f, txt_d, s, lam):
    img_f, img_d = [unit(v) for v in rows(img_f)], [unit(v) for v in rows(img_d)]
    txt_f, txt_d = [unit(v) for v in rows(txt_f)], [unit(v) for v in rows(txt_d)]
    denom = min(max(1 - lam, 1e-3), 1 - 1e-3)
    txt_r = [[(d - lam * f) / denom for d, f in zip(vd, vf)] for vd, vf in zip(txt_d, txt_f)]
    img_r = [[(d - lam * f) / denom for d, f in zip(vd, vf)] for vd, vf in zip(img_d, img_f)]
    h_txt = mean([entropy([s * dot(i, t) for t in txt_r]) for i in img_f])
    h_vis = mean([entropy([s * dot(i, t) for t in txt_f]) for i in img_r])
    return h_txt, h_vis


def hand_js(vis, txt, labels):
    per_sample = []
    for i, y in enumerate(labels):
        per_m = []
        for m in range(len(vis[i])):
            u, v = unit(vis[i][m]), unit(txt[y][m])
            c = [(a + b) / 2 for a, b in zip(u, v)]
            per_m.append(((1 - dot(u, c)) + (1 - dot(v, c))) / 2)
        per_sample.append(mean(per_m))
    return mean(per_sample)


def hand_kl(logits, frozen):
    total, n = 0.0, 0
    for lr, fr in zip(logits, frozen):
        p, q = softmax(fr), softmax(lr)  # p: frozen (target), q: prompted
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
        n += len(lr)
    return total / n


def hand_l1(a, b):
    a, b = [unit(v) for v in rows(a)], [unit(v) for v in rows(b)]
    diffs = [abs(x - y) for va, vb in zip(a, b) for x, y in zip(va, vb)]
    return mean(diffs)


def hand_ce(logits, labels):
    return mean([-math.log(softmax(row)[y]) for row, y in zip(logits, labels)])


@pytest.fixture
def tiny():
    g = torch.Generator().manual_seed(0)
    B, C, D, M, P = 3, 4, 5, 2, 6
    t = {
        "img_f": torch.randn(B, D, generator=g, dtype=torch.float64),
        "img_d": torch.randn(B, D, generator=g, dtype=torch.float64),
        "txt_f": torch.randn(C, D, generator=g, dtype=torch.float64),
        "txt_d": torch.randn(C, D, generator=g, dtype=torch.float64),
        "labels": torch.tensor([2, 0, 3]),
        "vis": [torch.randn(B, M, P, generator=g, dtype=torch.float64) for _ in range(3)],
        "txt": [torch.randn(C, M, P, generator=g, dtype=torch.float64) for _ in range(3)],
    }
    return t


# ---------------------------------------------------------------- tests


def test_residual_lambda_values():
    assert residual_lambda(0, 20) == 0.0
    for e, E in [(1, 20), (5, 20), (10, 20), (19, 20), (20, 20), (2, 5), (0.5, 5)]:
        expected = 0.1 - 0.1 * (1 + 10 * e / E) ** -0.75
        assert residual_lambda(e, E) == pytest.approx(expected, rel=1e-12)
    assert residual_lambda(20, 20) == pytest.approx(0.1 - 0.1 * 11 ** -0.75)  # ≈ 0.0834
    assert residual_lambda(10, 20, lambda0=0.2) == pytest.approx(2 * residual_lambda(10, 20))
    lams = [residual_lambda(e, 20) for e in range(21)]
    assert all(a < b for a, b in zip(lams, lams[1:])) and lams[-1] < 0.1
    with pytest.raises(ValueError, match="total_epochs"):
        residual_lambda(1, 0)
    with pytest.raises(ValueError, match="epoch"):
        residual_lambda(-1, 10)


@pytest.mark.parametrize("lam", [0.0, 0.05, 0.0834, 1.0, 1.5])
def test_residual_entropy(tiny, lam):
    s = 4.0
    h_txt, h_vis = residual_entropy(tiny["img_f"], tiny["img_d"], tiny["txt_f"], tiny["txt_d"], s, lam)
    e_txt, e_vis = hand_entropies(tiny["img_f"], tiny["img_d"], tiny["txt_f"], tiny["txt_d"], s, lam)
    assert h_txt.item() == pytest.approx(e_txt, rel=1e-9)
    assert h_vis.item() == pytest.approx(e_vis, rel=1e-9)


def test_residual_entropy_sides_differ(tiny):
    # swapping which side is frozen must change the answer (guards against H_txt/H_vis mix-ups)
    h = residual_entropy(tiny["img_f"], tiny["img_d"], tiny["txt_f"], tiny["txt_d"], 10.0, 0.05)
    e = hand_entropies(tiny["img_f"], tiny["img_d"], tiny["txt_f"], tiny["txt_d"], 10.0, 0.05)
    assert abs(e[0] - e[1]) > 1e-3
    assert h[0].item() == pytest.approx(e[0]) and h[1].item() == pytest.approx(e[1])


def test_residual_entropy_gradient_only_to_prompted(tiny):
    img_d = tiny["img_d"].clone().requires_grad_()
    img_f = tiny["img_f"].clone().requires_grad_()
    h_txt, h_vis = residual_entropy(img_f, img_d, tiny["txt_f"], tiny["txt_d"], 5.0, 0.05)
    (h_txt + h_vis).backward()
    assert img_d.grad is not None and img_d.grad.abs().sum() > 0
    assert img_f.grad is None  # frozen features are targets


def test_js_alignment(tiny):
    got = js_alignment(tiny["vis"][0], tiny["txt"][0], tiny["labels"])
    expected = hand_js(tiny["vis"][0].tolist(), tiny["txt"][0].tolist(), tiny["labels"].tolist())
    assert got.item() == pytest.approx(expected, rel=1e-10)
    # identical directions give 0; opposite give 1
    v = tiny["txt"][0][tiny["labels"]]
    assert js_alignment(3 * v, tiny["txt"][0], tiny["labels"]).item() == pytest.approx(0, abs=1e-12)
    assert js_alignment(-v, tiny["txt"][0], tiny["labels"]).item() == pytest.approx(1, abs=1e-12)
    with pytest.raises(ValueError, match="expected vision"):
        js_alignment(tiny["vis"][0][:, :1], tiny["txt"][0], tiny["labels"])


def test_alignment_loss_skips_none(tiny):
    labels = tiny["labels"].tolist()
    vis = [tiny["vis"][0], None, tiny["vis"][2]]
    txt = [tiny["txt"][0], tiny["txt"][1], tiny["txt"][2]]
    got = alignment_loss(vis, txt, tiny["labels"])
    expected = mean([hand_js(tiny["vis"][i].tolist(), tiny["txt"][i].tolist(), labels) for i in (0, 2)])
    assert got.item() == pytest.approx(expected, rel=1e-10)
    empty = alignment_loss([], [], tiny["labels"])
    assert torch.is_tensor(empty) and empty.item() == 0.0
    assert alignment_loss([None], [tiny["txt"][0]], tiny["labels"]).item() == 0.0
    with pytest.raises(ValueError, match="2 vision layers but 1 text"):
        alignment_loss(vis[:2], txt[:1], tiny["labels"])


def test_kl_to_frozen():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, generator=g, dtype=torch.float64)
    frozen = torch.randn(3, 5, generator=g, dtype=torch.float64)
    got = kl_to_frozen(logits, frozen)
    assert got.item() == pytest.approx(hand_kl(logits.tolist(), frozen.tolist()), rel=1e-10)
    assert kl_to_frozen(frozen, frozen).item() == pytest.approx(0, abs=1e-12)
    # direction: it is Σ p_frozen log(p_frozen / p_prompted), not the reverse
    reverse = hand_kl(frozen.tolist(), logits.tolist())
    assert abs(got.item() - reverse) > 1e-4
    # temperature T: divides logits by T and multiplies by T²
    T = 2.0
    hand_t = hand_kl((logits / T).tolist(), (frozen / T).tolist()) * T * T
    assert kl_to_frozen(logits, frozen, temperature=T).item() == pytest.approx(hand_t, rel=1e-10)


def test_drople_loss_total_and_terms(tiny):
    s = 7.0
    txt_d = tiny["txt_d"].clone().requires_grad_()
    img_d = tiny["img_d"]
    zi = torch.nn.functional.normalize(img_d, dim=-1)
    zt = torch.nn.functional.normalize(txt_d, dim=-1)
    logits = s * zi @ zt.t()
    frozen_logits = s * torch.nn.functional.normalize(tiny["img_f"], dim=-1) @ torch.nn.functional.normalize(tiny["txt_f"], dim=-1).t()
    w = LossWeights(ce=1.5, text_l1=20.0, image_l1=7.0, kl=3.0, entropy=0.2, align=11.0, lambda0=0.2)
    total, terms = drople_loss(
        logits, tiny["labels"], img_d, txt_d, tiny["img_f"], tiny["txt_f"], frozen_logits, s,
        epoch=3, total_epochs=10, vis_bridge=tiny["vis"], txt_bridge=tiny["txt"], weights=w,
    )
    labels = tiny["labels"].tolist()
    lam = 0.2 - 0.2 * (1 + 10 * 3 / 10) ** -0.75
    e_txt, e_vis = hand_entropies(tiny["img_f"], img_d, tiny["txt_f"], txt_d.detach(), s, lam)
    hand = {
        "ce": hand_ce(rows(logits), labels),
        "text_l1": hand_l1(txt_d.detach(), tiny["txt_f"]),
        "image_l1": hand_l1(img_d, tiny["img_f"]),
        "kl": hand_kl(rows(logits), rows(frozen_logits)),
        "entropy_txt": e_txt,
        "entropy_vis": e_vis,
        "align": mean([hand_js(v.tolist(), t.tolist(), labels) for v, t in zip(tiny["vis"], tiny["txt"])]),
        "lambda": lam,
    }
    for k, v in hand.items():
        assert terms[k].item() == pytest.approx(v, rel=1e-9), k
    expected_total = (1.5 * hand["ce"] + 20 * hand["text_l1"] + 7 * hand["image_l1"] + 3 * hand["kl"]
                      - 0.2 * (e_txt + e_vis) + 11 * hand["align"])
    assert total.item() == pytest.approx(expected_total, rel=1e-9)
    assert terms["total"] is total
    total.backward()
    assert txt_d.grad is not None and txt_d.grad.abs().sum() > 0


def test_default_weights_match_design():
    w = LossWeights()
    assert (w.ce, w.text_l1, w.image_l1, w.kl, w.entropy, w.align, w.lambda0) == (1, 25, 10, 2.5, 0.05, 30, 0.1)


def test_drople_loss_without_bridges(tiny):
    s = 3.0
    logits = torch.randn(3, 4, dtype=torch.float64)
    total, terms = drople_loss(logits, tiny["labels"], tiny["img_d"], tiny["txt_d"], tiny["img_f"],
                               tiny["txt_f"], logits.clone(), s, epoch=0, total_epochs=5)
    assert terms["align"].item() == 0.0 and terms["kl"].item() == pytest.approx(0, abs=1e-12)
    assert terms["lambda"].item() == 0.0
    w = LossWeights()
    expected = (terms["ce"] + w.text_l1 * terms["text_l1"] + w.image_l1 * terms["image_l1"]
                - w.entropy * (terms["entropy_txt"] + terms["entropy_vis"]))
    assert total.item() == pytest.approx(expected.item(), rel=1e-12)
