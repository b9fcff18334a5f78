"""An independent, per-sample reference for the open_clip patch (tests only).

It runs the ORIGINAL open_clip blocks (an unpatched ``copy.deepcopy`` of the
model taken before ``drople_fast.apply``) one sample at a time, on exactly the
tokens that sample still has -- no padding, no key-padding masks, no gather op.
At every IWTD layer it materialises the layer's softmax attention from the
block's own ``ln_1`` + packed ``in_proj`` (causal for text), scores it with
``drople_fast.ops.reference.iwtd_from_attention`` (docs/design.md §2 steps 1-6) and draws
the Bernoulli mask itself from ``drople_fast.ops.philox.token_uniform`` at offset
``b * W + j``, where ``W`` is the width the *untrimmed* batched text tower
would have at that layer (the longest sample, plus -- in the text tower until
a "drop" compaction -- the padding tail after the longest EOS), so EOS
trimming never changes a draw.

Semantics replicated from docs/design.md §7 and the patch docstrings:

* layout ``[anchor-prefix, prompts, rest]``; a layer's prompts go in at
  position 1 and replace the previous layer's (whatever of them survived);
* vision prompts at layer 0 go through ``ln_pre`` (the release concatenates
  them before its pre-LayerNorm, release/models/drople.py:753-757), deeper
  ones are inserted as given; text prompts at layer 0
  replace the placeholder ids after SOS and get their positional embedding,
  deeper text prompts get none;
* seeds (transcribed from the layout in ``drople_fast/clip/seeds.py``, not
  imported from it): forward ``n`` (1-based count of training forwards of
  that tower with IWTD layers), layer ``l`` of tower ``t`` (0 vision, 1 text)
  uses the key ``splitmix64(cfg.seed) ^ (n << 12 | l << 1 | t)``;
* eligible: vision every token but CLS (prompts included); text the prompt
  tokens when the hook supplies text prompts, otherwise every word strictly
  between SOS and EOS;
* "perturb": selected tokens x (1 + sigma * n) with one normal per element (b, j, d) at the Philox
  counter (b * row_stride + j) * D + d of the noise key (release/utils/token_importance.py:173-174);
* "drop": selected tokens removed; when the next layer supplies prompts the
  old prompts are removed as well;
* "drop_fixed": exactly ``keep_count(#eligible)`` eligible tokens kept, the
  top-k of ``log(1 - p) + Gumbel`` with the Gumbel noise drawn on
  ``philox.gumbel_seed(layer_seed)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from drople_fast.clip.patch import text_tower
from drople_fast.ops.noise import element_normal, element_offsets, noise_key
from drople_fast.ops.philox import gumbel_seed, token_uniform
from drople_fast.ops.reference import iwtd_from_attention

TOWER_INDEX = {"vision": 0, "text": 1}


def _splitmix64(x: int) -> int:
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def forward_seed(config_seed: int, forward_count: int, tower: str) -> int:
    """The key of layer 0 of the ``forward_count``-th (1-based) IWTD training forward of ``tower``."""
    return _signed(_splitmix64(config_seed) ^ (forward_count << 12) ^ TOWER_INDEX[tower])


def layer_seed_of(forward_key: int, layer: int) -> int:
    return forward_key ^ (layer << 1)


@dataclass
class Sample:
    x: torch.Tensor  # (n, D)
    prompt: torch.Tensor  # (n,) bool
    eligible: torch.Tensor  # (n,) bool
    anchor: int

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def select(self, keep: torch.Tensor) -> "Sample":
        idx = keep.nonzero().flatten()
        anchor = int(keep[: self.anchor].sum())
        assert bool(keep[self.anchor]), "the anchor must never be removed"
        return Sample(self.x[idx], self.prompt[idx], self.eligible[idx], anchor)

    def replace_prompts(self, prompts: torch.Tensor) -> "Sample":
        """Remove the current prompts, insert ``prompts`` (n, D) at position 1."""
        s = self.select(~self.prompt)
        n = prompts.shape[0]
        flag = torch.ones(n, dtype=torch.bool)
        x = torch.cat([s.x[:1], prompts.to(s.x.dtype), s.x[1:]])
        cat = lambda t, v: torch.cat([t[:1], v, t[1:]])  # noqa: E731
        return Sample(x, cat(s.prompt, flag), cat(s.eligible, flag), s.anchor + n if s.anchor > 0 else s.anchor)


@dataclass
class LayerLog:
    """What the reference decided at one IWTD layer (per sample lists)."""

    width: int
    drop_prob: list = field(default_factory=list)
    drop_mask: list = field(default_factory=list)
    eligible: list = field(default_factory=list)
    features: Optional[torch.Tensor] = None  # (B, M, P)


def _qk(block, x: torch.Tensor):
    """(H, n, Dh) q and k of an open_clip block from its own ln_1 and packed in_proj."""
    attn = block.attn
    n, D = x.shape
    H = attn.num_heads
    packed = nn.functional.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, _ = packed.view(n, 3, H, D // H).permute(1, 2, 0, 3)
    return q, k


def _attention(q, k, causal: bool) -> torch.Tensor:
    """(H, n, n) float32 softmax attention, explicitly materialised."""
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[1]
        logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(logits, dim=-1)


def _bridge_features(h: torch.Tensor, bridge, tower: str) -> torch.Tensor:
    """(M, P) pooled bridge features of one sample: G (W h + b), G = softmax_tokens(T (W h + b)^T)."""
    proj = bridge.vision if tower == "vision" else bridge.text
    mapped = proj(h)  # (n, P)
    gate = torch.softmax(bridge.tokens @ mapped.t(), dim=-1)  # (M, n)
    return gate @ mapped


def _causal_mask(n: int, dtype) -> torch.Tensor:
    return torch.full((n, n), float("-inf"), dtype=dtype).triu(1)


def run_block(block, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """The original open_clip block on one sample (1, n, D)."""
    mask = _causal_mask(x.shape[0], x.dtype) if causal else None
    return block(x[None], attn_mask=mask)[0]


def run_tower(blocks, samples: list[Sample], tower: str, causal: bool, cfg, bridge, prompts_at, seed: Optional[int],
              layers, tail: int = 0, stride_tail: int = 0):
    """Run ``blocks`` per sample with prompts and IWTD; returns (samples, {layer: LayerLog})."""
    logs: dict[int, LayerLog] = {}
    B = len(samples)
    for i, block in enumerate(blocks):
        p = prompts_at(i) if i > 0 else None
        if p is not None:
            samples = [s.replace_prompts(p.expand(B, -1, -1)[b]) for b, s in enumerate(samples)]
        if seed is None or i not in layers:
            samples = [Sample(run_block(block, s.x, causal), s.prompt, s.eligible, s.anchor) for s in samples]
            continue
        replace_next = i + 1 < len(blocks) and prompts_at(i + 1) is not None
        width = max(s.n for s in samples) + tail
        stride = max(s.n for s in samples) + stride_tail
        layer_seed = layer_seed_of(seed, i)
        seed_t = torch.tensor(layer_seed, dtype=torch.int64)
        uniform = token_uniform(seed_t, B, width, row_stride=stride)
        gumbel = -torch.log(-torch.log(token_uniform(gumbel_seed(seed_t), B, width, row_stride=stride)
                                       .clamp(min=1e-20)))
        folded = (bridge.tokens.float() @ (bridge.vision if tower == "vision" else bridge.text).weight.float())
        shift = bridge.tokens.float() @ (bridge.vision if tower == "vision" else bridge.text).bias.float()
        log = LayerLog(width)
        # drop_fixed budget: a static shape needs one budget for the batch, from the largest eligible count
        n_cand = max(int((s.eligible & ~(s.prompt if replace_next else torch.zeros_like(s.prompt))).sum()
                         - int(s.eligible[s.anchor])) for s in samples)
        budget = cfg.keep_count(n_cand) if n_cand > 0 else 0
        feats, out = [], []
        for b, s in enumerate(samples):
            q, k = _qk(block, s.x)
            h = run_block(block, s.x, causal)
            with torch.no_grad():
                attn = _attention(q, k, causal)
                ones = torch.ones(1, s.n, dtype=torch.bool)
                _, drop_prob, _, _, _ = iwtd_from_attention(
                    attn[None], h.detach()[None], s.eligible[None], ones, torch.tensor([s.anchor]), folded, shift,
                    cfg.p_min, cfg.p_max, 0)
                drop_prob = drop_prob[0]
                elig = s.eligible.clone()
                elig[s.anchor] = False
                mask = elig & (uniform[b, : s.n] < drop_prob)
            log.drop_prob.append(drop_prob)
            log.drop_mask.append(mask)
            log.eligible.append(elig)
            feats.append(_bridge_features(h, bridge, tower))
            if cfg.mode == "perturb":
                rows = b * width + torch.arange(s.n, dtype=torch.int64)
                noise = element_normal(noise_key(seed_t), element_offsets(rows, width, h.shape[-1], stride))
                scale = 1.0 + cfg.sigma * noise * mask.to(h.dtype)[:, None]
                out.append(Sample(h * scale, s.prompt, s.eligible, s.anchor))
            elif cfg.mode == "drop":
                keep = ~mask & ~(s.prompt if replace_next else torch.zeros_like(mask))
                out.append(Sample(h, s.prompt, s.eligible, s.anchor).select(keep))
            elif cfg.mode == "drop_fixed":
                # exactly keep_count(#eligible) eligible tokens, Gumbel-top-k on log keep-probability
                doomed = s.prompt if replace_next else torch.zeros_like(mask)
                cand = elig & ~doomed
                score = torch.log((1.0 - drop_prob).clamp(min=1e-30)) + gumbel[b, : s.n]
                chosen = score.masked_fill(~cand, float("-inf")).topk(min(budget, int(cand.sum()))).indices
                keep = ~elig & ~doomed
                keep[chosen] = True
                out.append(Sample(h, s.prompt, s.eligible, s.anchor).select(keep))
            else:
                raise ValueError(f"no per-sample reference for mode {cfg.mode!r}")
        log.features = torch.stack(feats)
        logs[i] = log
        samples = out
        if cfg.mode == "drop":  # widths now agree trimmed or not (drop_fixed keeps its static padding)
            tail = stride_tail = 0
    return samples, logs


class ReferenceCounter:
    """Counts training forwards per tower like the patch does (only those with IWTD layers)."""

    def __init__(self):
        self.count = {"vision": 0, "text": 0}

    def next(self, tower: str, cfg, training: bool) -> Optional[int]:
        layers = cfg.vision_layers if tower == "vision" else cfg.text_layers
        if not (training and cfg.mode != "off" and len(layers) > 0):
            return None
        self.count[tower] += 1
        return forward_seed(cfg.seed, self.count[tower], tower)


def vision_reference(orig_model, images, cfg, bridge, hook, seed: Optional[int]):
    """Pooled image features (B, E) and per-layer logs from the unpatched copy ``orig_model``."""
    visual = orig_model.visual
    x = visual._embeds(images)
    B, S, _ = x.shape
    prompts_at = (lambda i: hook.vision_prompts(i, B)) if hook is not None else (lambda i: None)
    samples = []
    for b in range(B):
        elig = torch.arange(S) > 0
        samples.append(Sample(x[b], torch.zeros(S, dtype=torch.bool), elig, 0))
    first = prompts_at(0)
    if first is not None:
        first = visual.ln_pre(first)
        samples = [s.replace_prompts(first.expand(B, -1, -1)[b]) for b, s in enumerate(samples)]
    samples, logs = run_tower(visual.transformer.resblocks, samples, "vision", False, cfg, bridge, prompts_at, seed,
                              set(cfg.vision_layers))
    final = torch.stack([s.x[0] for s in samples])  # CLS stays first
    pooled = visual.ln_post(final)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled, logs


def text_reference(orig_model, text: torch.Tensor, cfg, bridge, hook, seed: Optional[int], eos_trim: bool = True):
    """Pooled text features (B, E) and per-layer logs; argmax pooling (EOS = largest id)."""
    owner = text_tower(orig_model)
    B, L = text.shape
    eos = text.argmax(dim=-1)
    x = owner.token_embedding(text) + owner.positional_embedding[:L]
    prompts_at = (lambda i: hook.text_prompts(i, B)) if hook is not None else (lambda i: None)
    first = prompts_at(0)
    samples = []
    for b in range(B):
        n = int(eos[b]) + 1
        xb = x[b, :n]
        pos = torch.arange(n)
        if first is not None:
            nc = first.shape[1]
            ctx = first.expand(B, -1, -1)[b] + owner.positional_embedding[1:1 + nc]
            xb = torch.cat([xb[:1], ctx.to(xb.dtype), xb[1 + nc:]])
            prompt = (pos >= 1) & (pos <= nc)
            elig = prompt.clone()
        else:
            prompt = torch.zeros(n, dtype=torch.bool)
            elig = (pos > 0) & (pos < n - 1)
        samples.append(Sample(xb, prompt, elig, n - 1))
    width = int(eos.max()) + 1 if eos_trim else L
    tail = width - (int(eos.max()) + 1)
    samples, logs = run_tower(owner.transformer.resblocks, samples, "text", True, cfg, bridge, prompts_at, seed,
                              set(cfg.text_layers), tail=tail, stride_tail=L - (int(eos.max()) + 1))
    final = torch.stack([s.x[s.anchor] for s in samples])
    pooled = owner.ln_final(final)
    proj = owner.text_projection
    if proj is not None:
        pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
    return pooled, logs


class Prompts(nn.Module):
    """A tiny PromptHook: (1, n, D) learnable prompts for the given layers of each tower."""

    def __init__(self, vision_width: int, text_width: int, vision_layers=(0, 1, 2), text_layers=(0, 1, 2),
                 n_vision=2, n_text=3, seed: int = 0, scale: float = 0.5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        nv = n_vision if isinstance(n_vision, (list, tuple)) else [n_vision] * len(vision_layers)
        nt = n_text if isinstance(n_text, (list, tuple)) else [n_text] * len(text_layers)
        self.vision = nn.ParameterDict({str(l): nn.Parameter(torch.randn(1, n, vision_width, generator=g) * scale)
                                        for l, n in zip(vision_layers, nv)})
        self.text = nn.ParameterDict({str(l): nn.Parameter(torch.randn(1, n, text_width, generator=g) * scale)
                                      for l, n in zip(text_layers, nt)})

    def vision_prompts(self, layer: int, batch: int):
        return self.vision[str(layer)] if str(layer) in self.vision else None

    def text_prompts(self, layer: int, batch: int):
        return self.text[str(layer)] if str(layer) in self.text else None


def make_text(lengths, context_length: int = 77, n_ctx: int = 0, seed: int = 0, placeholder: int = 343):
    """Token ids [SOS, placeholders x n_ctx, words x length, EOS, 0...] with EOS the largest id (argmax pooling)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        words = torch.randint(1, 49000, (n,), generator=g).tolist()
        ids = [49406] + [placeholder] * n_ctx + words + [49407]
        rows.append(ids + [0] * (context_length - len(ids)))
    return torch.tensor(rows, dtype=torch.int64)
