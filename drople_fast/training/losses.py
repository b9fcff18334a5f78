"""The DroPLe training loss (docs/design.md §8), every weight configurable.

total = ce·CE(logits, y)
      + text_l1·L1(Zᵈ_txt, Z°_txt) + image_l1·L1(Zᵈ_img, Z°_img)
      + kl·KL
      − entropy·(H_txt + H_vis)
      + align·alignment

Conventions:
* ``logit_scale`` is the multiplier s applied to cosine similarities, i.e.
  ``model.logit_scale.exp()``, not the stored log value.
* Features are unit-normalised inside (idempotent on normalised input); the
  L1 terms and the residual therefore compare unit vectors, as the release does.
* Frozen-CLIP features are teacher targets and are detached; the logit
  scale is not: the release trains it through every term that uses it,
  the distillation target included (release/models/drople.py:896-914).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


@dataclass
class LossWeights:
    ce: float = 1.0
    text_l1: float = 25.0
    image_l1: float = 10.0
    kl: float = 2.5
    entropy: float = 0.05
    align: float = 30.0
    lambda0: float = 0.1


def residual_lambda(epoch: float, total_epochs: float, lambda0: float = 0.1) -> float:
    """λ_e = λ0 − λ0·(1 + 10·e/E)^(−0.75); e is the 0-based epoch (may be fractional)."""
    if total_epochs <= 0:
        raise ValueError(f"total_epochs must be positive, got {total_epochs}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return lambda0 - lambda0 * (1.0 + 10.0 * epoch / total_epochs) ** (-0.75)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the softmax entropy over the last dim."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def residual_entropy(
    img_frozen: torch.Tensor,
    img_prompted: torch.Tensor,
    txt_frozen: torch.Tensor,
    txt_prompted: torch.Tensor,
    logit_scale,
    lam: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(H_txt, H_vis) of the residual features.

    Zʳ = (Zᵈ − λ Z°) / (1 − λ), with 1 − λ clamped to [1e-3, 1 − 1e-3] as in
    the release. H_txt = H(s·Z°_img·Zʳ_txtᵀ), H_vis = H(s·Zʳ_img·Z°_txtᵀ);
    images are (B, D), texts (C, D); entropies over classes, mean over batch.
    """
    zi_f = F.normalize(img_frozen.detach(), dim=-1)
    zt_f = F.normalize(txt_frozen.detach(), dim=-1)
    zi_d = F.normalize(img_prompted, dim=-1)
    zt_d = F.normalize(txt_prompted, dim=-1)
    denom = min(max(1.0 - float(lam), 1e-3), 1.0 - 1e-3)
    zt_r = (zt_d - lam * zt_f) / denom
    zi_r = (zi_d - lam * zi_f) / denom
    h_txt = _entropy(logit_scale * zi_f @ zt_r.t())
    h_vis = _entropy(logit_scale * zi_r @ zt_f.t())
    return h_txt, h_vis


def js_alignment(feat_vis: torch.Tensor, feat_txt: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One layer's bridge alignment: vision (B, M, P) against the label's text (C, M, P).

    With u, v unit over P and c = (u + v)/2: JS = ((1 − u·c) + (1 − v·c))/2,
    averaged over the M bridge tokens and then over samples.
    """
    if feat_vis.dim() != 3 or feat_txt.dim() != 3 or feat_vis.shape[1:] != feat_txt.shape[1:]:
        raise ValueError(
            f"expected vision (B, M, P) and text (C, M, P) features, got {tuple(feat_vis.shape)} and {tuple(feat_txt.shape)}"
        )
    u = F.normalize(feat_vis, dim=-1)
    v = F.normalize(feat_txt[labels], dim=-1)
    c = (u + v) / 2
    js = ((1 - (u * c).sum(-1)) + (1 - (v * c).sum(-1))) / 2  # (B, M)
    return js.mean(dim=1).mean()


def alignment_loss(
    vis_feats: Sequence[Optional[torch.Tensor]],
    txt_feats: Sequence[Optional[torch.Tensor]],
    labels: torch.Tensor,
) -> torch.Tensor:
    """Mean of :func:`js_alignment` over the layers where both towers have
    features (None entries skipped); a zero tensor when there are none."""
    if len(vis_feats) != len(txt_feats):
        raise ValueError(f"got {len(vis_feats)} vision layers but {len(txt_feats)} text layers")
    terms = [js_alignment(v, t, labels) for v, t in zip(vis_feats, txt_feats) if v is not None and t is not None]
    if not terms:
        return torch.zeros((), device=labels.device)
    return torch.stack(terms).mean()


def kl_to_frozen(logits: torch.Tensor, frozen_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The release's (PromptSRC's) logit distillation term, exactly:

        F.kl_div(log_softmax(logits/T), log_softmax(frozen/T), reduction='sum',
                 log_target=True) · T² / logits.numel()

    i.e. Σ_{i,c} p°_ic (log p°_ic − log pᵈ_ic) / (B·C), with p° the frozen and
    pᵈ the prompted softmax. Note that, as written in PyTorch, this is
    KL(frozen ‖ prompted) divided by B·C (not B); the paper's "KL(prompted ‖
    frozen)" names the same release term. T = 1 by default.

    ``frozen_logits`` is not detached: its features carry no gradient, and the
    trainable logit scale that multiplies it gets the release's gradient
    through the target too (release/models/drople.py:902-904).
    """
    t = temperature
    return (
        F.kl_div(
            F.log_softmax(logits / t, dim=1),
            F.log_softmax(frozen_logits / t, dim=1),
            reduction="sum",
            log_target=True,
        )
        * (t * t)
        / logits.numel()
    )


def drople_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    img_prompted: torch.Tensor,
    txt_prompted: torch.Tensor,
    img_frozen: torch.Tensor,
    txt_frozen: torch.Tensor,
    frozen_logits: torch.Tensor,
    logit_scale,
    epoch: float,
    total_epochs: float,
    vis_bridge: Sequence[Optional[torch.Tensor]] = (),
    txt_bridge: Sequence[Optional[torch.Tensor]] = (),
    weights: Optional[LossWeights] = None,
    bridge_labels: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Total DroPLe loss and its named, unweighted terms.

    ``logits`` (B, C) are the prompted logits, ``frozen_logits`` the frozen
    CLIP's; image features are (B, D), text features (C, D) (one per class);
    ``vis_bridge`` / ``txt_bridge`` are the per-layer bridge features for
    :func:`alignment_loss`; ``bridge_labels`` (default ``labels``) is the row of each text
    bridge tensor that sample i aligns with (when they are pooled for the batch's labels only).
    The returned dict holds "ce", "text_l1", "image_l1", "kl", "entropy_txt", "entropy_vis", "align" (unweighted),
    "lambda" and "total".
    """
    w = weights or LossWeights()
    lam = residual_lambda(epoch, total_epochs, w.lambda0)
    zt_d, zt_f = F.normalize(txt_prompted, dim=-1), F.normalize(txt_frozen.detach(), dim=-1)
    zi_d, zi_f = F.normalize(img_prompted, dim=-1), F.normalize(img_frozen.detach(), dim=-1)
    terms = {
        "ce": F.cross_entropy(logits, labels),
        "text_l1": F.l1_loss(zt_d, zt_f, reduction="mean"),
        "image_l1": F.l1_loss(zi_d, zi_f, reduction="mean"),
        "kl": kl_to_frozen(logits, frozen_logits),
    }
    terms["entropy_txt"], terms["entropy_vis"] = residual_entropy(
        img_frozen, img_prompted, txt_frozen, txt_prompted, logit_scale, lam
    )
    terms["align"] = alignment_loss(list(vis_bridge), list(txt_bridge), labels if bridge_labels is None else bridge_labels)
    total = (
        w.ce * terms["ce"]
        + w.text_l1 * terms["text_l1"]
        + w.image_l1 * terms["image_l1"]
        + w.kl * terms["kl"]
        - w.entropy * (terms["entropy_txt"] + terms["entropy_vis"])
        + w.align * terms["align"]
    )
    terms["lambda"] = logits.new_tensor(lam)
    terms["total"] = total
    return total, terms
