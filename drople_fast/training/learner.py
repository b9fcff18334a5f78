"""The DroPLe prompt learner over a patched open_clip ViT CLIP (docs/design.md §8).

:class:`DroPLe` owns the learnable parts and nothing else trains. Every
default is the release's (README, "release vs drople_fast defaults"):

* text context: 4 tokens initialised from the embeddings of "a photo of a"
  (release/models/drople.py:231-236); deep: a fresh context for every text
  layer 1..8, ``kaiming_uniform_(a=sqrt(5))`` (release/models/drople.py:239-243);
* visual prompts: 4 tokens for every vision layer 0..5, drawn as the release's
  one (depth, n, D) tensor with ``kaiming_uniform_(a=sqrt(5))``
  (release/models/drople.py:225-228); layer 0's go through ``ln_pre``;
* a trainable logit scale, ``ln(1/0.01)``, clamped to [0, 4.605] before every
  use (release/models/drople.py:410, 828);
* LoRA (rank 8, alpha 16, dropout 0.1, peft's initialisation) on the q and v
  projections of vision layers 6..11 (release/scripts/launch/launch.sh:42-44,60-61);
* the IWTD bridge that :func:`drople_fast.apply` attaches to the model.

LoRA does not rename or wrap any weight: the factors live on the learner and
are attached to the attention module as a plain attribute that the patched
blocks' q/k/v projection reads (:func:`drople_fast.clip.attention.in_proj`),
so ``model.state_dict()`` keeps open_clip's keys and pretrained checkpoints
still load.

The frozen CLIP teacher is the same model run with the prompt hook removed,
LoRA disabled, in eval mode (so IWTD is inactive) and without grad. (The
release's peft wraps its vision model in place, so its teacher runs through
LoRA too; keeping LoRA out of the teacher is a documented deviation.) Its
class text features are computed once per class list and cached; its image
features come from the clean (unaugmented) image, once per training image
(:class:`drople_fast.training.teacher_cache.TeacherImageCache`).

Class prompts for the learner are ``"X X X X {classname}"`` without a trailing
period, as the release tokenises ``"a photo of a {classname}"``
(release/models/drople.py:140-142): the patch replaces the placeholders after
SOS with the layer-0 context. The teacher's text features average
hand-written templates (CoOp's per-dataset template plus a small ensemble)
and, optionally, class descriptions from a JSON file (``{"classname":
["description", ...]}``) such as a language model writes; the file is never
required.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..clip.attention import ADAPTER_ATTR
from ..clip.config import IWTDConfig
from .data import DATASET_TEMPLATES
from .fileio import read_json
from .losses import LossWeights, drople_loss
from ..clip.patch import (apply, bridge_features, bridge_features_of, get_state, is_patched, set_prompt_hook,
                          text_tower)

CTX_INIT = "a photo of a"
PLACEHOLDER = "X"
# The student's class prompt: the release tokenises "a photo of a {}" with no trailing period
# (release/models/drople.py:141) and learns the context in place of "a photo of a".
CLASS_PROMPT = "{context} {classname}"
# release/models/drople.py:410: nn.Parameter(log(1 / 0.01)), trained; :828 clamps it to [0, 4.605]
# before every use (4.605 is the release's literal, just under ln(100) = 4.60517).
LOGIT_SCALE_INIT = math.log(1 / 0.01)
LOGIT_SCALE_MAX = 4.605
# release/scripts/launch/launch.sh:42-44,60-61 (and release/flags.py:29-33,66-67): LoRA on q/v of
# vision layers [6, 12), rank 8, alpha 16 (scale 2), dropout 0.1.
LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 8, 16.0, 0.1
LORA_FIRST_LAYER = 6
TEACHER_TEXT_BATCH = 512  # sentences per frozen text forward when caching the teacher's class features

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "itap of a {}.",
)


def templates_for(dataset: Optional[str]) -> List[str]:
    """The teacher's hand-written templates: the dataset's CoOp template first, then the ensemble."""
    first = DATASET_TEMPLATES.get(dataset or "", "a photo of a {}.")
    return [first] + [t for t in DEFAULT_TEMPLATES if t != first]


def load_descriptions(path: str) -> Dict[str, List[str]]:
    """Read ``{"classname": ["description", ...] or "description"}``; errors name the file."""
    data = read_json(path, "class description file")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object mapping class names to descriptions")
    out = {}
    for name, value in data.items():
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError(f"{path}: descriptions of {name!r} must be a string or a list of strings")
        out[name] = items
    return out


def _tokenize(texts: Sequence[str], context_length: int) -> torch.Tensor:
    import open_clip

    return open_clip.tokenize(list(texts), context_length=context_length)


# --------------------------------------------------------------------------
# LoRA without renaming weights
# --------------------------------------------------------------------------


def kaiming_uniform_release_(tensor: torch.Tensor) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(tensor, a=sqrt(5))``, the release's (and peft's, and nn.Linear's)
    initialiser: U(±1/sqrt(fan_in)) with fan_in = size(1) * prod(size[2:])."""
    if tensor.numel() == 0:
        return tensor
    with torch.no_grad():
        return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


class LoRA(nn.Module):
    """Rank-r updates of the q and v rows of a packed (3D, D) in-projection, as peft's LoRA Linear.

    ``forward(h)`` returns the (..., 3D) packed delta ``[B_q A_q drop(h), 0, B_v A_v drop(h)] * alpha/r``
    with an independent dropout per projection (peft gives q_proj and v_proj one dropout each).
    A is ``kaiming_uniform_(a=sqrt(5))`` and B zero: peft's ``init_lora_weights=True``.
    """

    def __init__(self, dim: int, rank: int = LORA_RANK, alpha: Optional[float] = LORA_ALPHA,
                 dropout: float = LORA_DROPOUT):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.dim, self.rank = dim, rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.q_a = nn.Parameter(kaiming_uniform_release_(torch.empty(rank, dim)))
        self.q_b = nn.Parameter(torch.zeros(dim, rank))
        self.v_a = nn.Parameter(kaiming_uniform_release_(torch.empty(rank, dim)))
        self.v_b = nn.Parameter(torch.zeros(dim, rank))
        self.dropout = dropout
        self.enabled = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        drop = lambda t: F.dropout(t, self.dropout, self.training)  # noqa: E731
        q = F.linear(F.linear(drop(h), self.q_a.to(h.dtype)), self.q_b.to(h.dtype)) * self.scale
        v = F.linear(F.linear(drop(h), self.v_a.to(h.dtype)), self.v_b.to(h.dtype)) * self.scale
        return torch.cat([q, torch.zeros_like(q), v], dim=-1)

    def delta(self) -> torch.Tensor:
        """The (3D, D) weight update this LoRA is worth without dropout."""
        zero = self.q_a.new_zeros(self.dim, self.dim)
        return torch.cat([self.q_b @ self.q_a, zero, self.v_b @ self.v_a], dim=0) * self.scale


def attach_lora(attn: nn.Module, lora: LoRA) -> None:
    """Let the patched blocks add ``lora`` to ``attn``'s q/k/v projection (not a registered submodule:
    the CLIP's state_dict keys stay open_clip's)."""
    object.__setattr__(attn, ADAPTER_ATTR, lora)


# --------------------------------------------------------------------------
# the learner
# --------------------------------------------------------------------------


class DroPLe(nn.Module):
    """Deep vision-language prompts + LoRA over a patched (frozen) open_clip CLIP.

    ``forward(images, labels=None, epoch=None, total_epochs=None, teacher_images=None,
    teacher_features=None)`` returns the (B, C) logits over the current class list
    (:meth:`set_classnames`); in training mode with labels it returns ``(logits, loss_terms)``
    where ``loss_terms["total"]`` is the DroPLe loss of :func:`drople_fast.training.losses.drople_loss`
    at ``epoch`` of ``total_epochs`` (default: :meth:`set_epoch`'s values). The frozen teacher
    sees ``teacher_images`` (the clean image; default ``images``), or its unit-normalised
    features are given directly as ``teacher_features`` (B, E).
    ``lora_rank=0`` turns LoRA off.
    """

    def __init__(self, model: nn.Module, classnames: Optional[Sequence[str]] = None,
                 iwtd: Optional[IWTDConfig] = None, n_ctx: int = 4, ctx_init: str = CTX_INIT,
                 text_depth: int = 9, n_vis: int = 4, vision_depth: int = 6, lora_rank: int = LORA_RANK,
                 lora_layers: Optional[Sequence[int]] = None, lora_alpha: float = LORA_ALPHA,
                 lora_dropout: float = LORA_DROPOUT, dataset: Optional[str] = None,
                 templates: Optional[Sequence[str]] = None, descriptions: Optional[str | Dict] = None,
                 loss_weights: Optional[LossWeights] = None):
        super().__init__()
        if not is_patched(model):
            apply(model, iwtd if iwtd is not None else IWTDConfig())
        self.clip = model
        self.loss_weights = loss_weights or LossWeights()
        owner = text_tower(model)
        self.context_length = int(owner.positional_embedding.shape[0])
        text_width = owner.token_embedding.weight.shape[1]
        vision_width = model.visual.transformer.width
        n_text_layers = len(owner.transformer.resblocks)
        n_vis_layers = len(model.visual.transformer.resblocks)
        if not 1 <= text_depth <= n_text_layers or not 0 <= vision_depth <= n_vis_layers:
            raise ValueError(f"prompt depths must be within the towers: text 1..{n_text_layers}, "
                             f"vision 0..{n_vis_layers}; got {text_depth}, {vision_depth}")
        self.n_ctx, self.n_vis = n_ctx, n_vis

        for p in model.parameters():
            p.requires_grad_(False)
        # The bridge only produces features (and gets gradients) when IWTD runs.
        bridge_trains = get_state(model).config.mode != "off"
        for p in get_state(model).bridge.parameters():
            p.requires_grad_(bridge_trains)

        # text context: layer 0 from "a photo of a" (its token embeddings; the patch adds the
        # positional embedding, which the release's init folds in: same input at every step)
        with torch.no_grad():
            ids = _tokenize([ctx_init], self.context_length).to(owner.token_embedding.weight.device)
            words = len(ctx_init.split())
            emb = owner.token_embedding(ids)[0, 1:1 + words].float()
        if words != n_ctx:
            raise ValueError(f"ctx_init {ctx_init!r} has {words} words but n_ctx={n_ctx}")
        dev = emb.device
        # deeper text layers: each (n_ctx, width) by kaiming_uniform_(a=sqrt(5)), fan_in = width
        # (release/models/drople.py:239-243, where width is ViT-B/16's 512)
        self.text_ctx = nn.ParameterList([nn.Parameter(emb.clone())] + [
            nn.Parameter(kaiming_uniform_release_(torch.empty(n_ctx, text_width, device=dev)))
            for _ in range(text_depth - 1)])
        # visual prompts: one (depth, n, D) tensor as the release draws it, fan_in = n * D
        # (release/models/drople.py:225-228), kept per layer
        vis = kaiming_uniform_release_(torch.empty(vision_depth, n_vis, vision_width, device=dev))
        self.vision_ctx = nn.ParameterList([nn.Parameter(vis[i].clone()) for i in range(vision_depth)])
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT, device=dev))

        # LoRA on q/v of vision layers 6..11 (the layers after the prompted ones)
        self.lora = nn.ModuleDict()
        if lora_rank > 0:
            layers = tuple(lora_layers) if lora_layers is not None else tuple(range(LORA_FIRST_LAYER, n_vis_layers))
            for i in layers:
                if not 0 <= i < n_vis_layers:
                    raise ValueError(f"LoRA layer {i} out of range for a {n_vis_layers}-layer vision tower")
                lora = LoRA(vision_width, lora_rank, lora_alpha, lora_dropout).to(dev)
                attach_lora(model.visual.transformer.resblocks[i].attn, lora)
                self.lora[str(i)] = lora

        self.dataset = dataset
        self.templates = list(templates) if templates else templates_for(dataset)
        if isinstance(descriptions, str):
            descriptions = load_descriptions(descriptions)
        self.descriptions = descriptions or {}
        self._teacher_cache: Dict[tuple, torch.Tensor] = {}
        # Which text bridge features the alignment pools: "labels" (the batch's classes) or "all"
        # (every class, then indexed: the same loss and gradients at C / B times the cost).
        self.text_bridge_rows = "labels"
        self.classnames: List[str] = []
        self.epoch, self.total_epochs = 0.0, 1.0
        set_prompt_hook(model, self)
        if classnames is not None:
            self.set_classnames(classnames)

    # ----- PromptHook ------------------------------------------------------

    def vision_prompts(self, layer: int, batch: int) -> Optional[torch.Tensor]:
        if layer < len(self.vision_ctx):
            return self.vision_ctx[layer].unsqueeze(0)
        return None

    def text_prompts(self, layer: int, batch: int) -> Optional[torch.Tensor]:
        if layer < len(self.text_ctx):
            return self.text_ctx[layer].unsqueeze(0)
        return None

    # ----- classes ---------------------------------------------------------

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Use ``classnames`` (index = label) for the logits from now on."""
        names = [c.replace("_", " ") for c in classnames]
        if not names:
            raise ValueError("need at least one class name")
        self.classnames = list(classnames)
        context = " ".join([PLACEHOLDER] * self.n_ctx)
        prompts = [CLASS_PROMPT.format(context=context, classname=n) for n in names]
        device = self.text_ctx[0].device
        self.register_buffer("prompt_ids", _tokenize(prompts, self.context_length).to(device), persistent=False)

    def set_epoch(self, epoch: float, total_epochs: float) -> None:
        self.epoch, self.total_epochs = float(epoch), float(total_epochs)

    def trainable_named_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    # ----- teacher ---------------------------------------------------------

    @contextlib.contextmanager
    def teacher_mode(self):
        """The frozen CLIP: no prompts, no LoRA, eval mode (IWTD inactive), no grad."""
        state = get_state(self.clip)
        hook, was_training = state.hook, self.clip.training
        loras = list(self.lora.values())
        state.hook = None
        for m in loras:
            m.enabled = False
        self.clip.train(False)
        try:
            with torch.no_grad():
                yield
        finally:
            self.clip.train(was_training)
            for m in loras:
                m.enabled = True
            state.hook = hook

    def teacher_text_features(self, classnames: Optional[Sequence[str]] = None) -> torch.Tensor:
        """(C, D) unit-normalised frozen-CLIP class features, averaged over templates and
        optional descriptions; computed once per class list."""
        classnames = list(classnames if classnames is not None else self.classnames)
        device = self.text_ctx[0].device
        key = (tuple(classnames), str(device))
        cached = self._teacher_cache.get(key)
        if cached is not None:
            return cached
        sentences, owner = [], []
        for c, name in enumerate(classnames):
            text = name.replace("_", " ")
            mine = [t.format(text) for t in self.templates] + list(self.descriptions.get(name, []))
            sentences += mine
            owner += [c] * len(mine)
        # All classes' sentences in a few large batches (one text forward per class costs 100 s at
        # ImageNet's 500 classes on a CPU); the means are taken per class afterwards.
        with self.teacher_mode():
            z = torch.cat([F.normalize(self.clip.encode_text(_tokenize(sentences[i:i + TEACHER_TEXT_BATCH],
                                                                       self.context_length).to(device)).float(), dim=-1)
                           for i in range(0, len(sentences), TEACHER_TEXT_BATCH)])
        index = torch.tensor(owner, device=z.device)
        sums = z.new_zeros(len(classnames), z.shape[1]).index_add_(0, index, z)
        counts = torch.bincount(index, minlength=len(classnames)).to(z.dtype)
        out = F.normalize(sums / counts[:, None], dim=-1)
        self._teacher_cache[key] = out
        return out

    def teacher_image_features(self, images: torch.Tensor) -> torch.Tensor:
        with self.teacher_mode():
            return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    # ----- student ---------------------------------------------------------

    def text_features(self) -> torch.Tensor:
        """(C, D) unit-normalised prompted class features (text forward over all classes)."""
        if not self.classnames:
            raise ValueError("no class names: call set_classnames first")
        return F.normalize(self.clip.encode_text(self.prompt_ids).float(), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(logit scale) after clamping the stored log scale to [0, 4.605] in place, as the
        release does before every use (release/models/drople.py:828, on ``.data``: the gradient
        reaches the parameter even at the bound)."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
        return self.logit_scale.exp().float()

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor,
               scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        scale = self.scale() if scale is None else scale
        return scale * image_features @ text_features.t()

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                epoch: Optional[float] = None, total_epochs: Optional[float] = None,
                teacher_images: Optional[torch.Tensor] = None, teacher_features: Optional[torch.Tensor] = None):
        scale = self.scale()
        txt = self.text_features()
        img = self.image_features(images)
        logits = self.logits(img, txt, scale)
        if not self.training or labels is None:
            return logits
        vis_bridge = dict(bridge_features(self.clip, ("vision",))["vision"])
        if self.text_bridge_rows == "labels":
            # The alignment reads the text features of the labels' classes only: pool those (B rows,
            # a repeated label pooled twice; no host sync) rather than all C classes at every layer.
            txt_bridge = bridge_features_of(self.clip, "text", labels)
            bridge_labels = torch.arange(labels.shape[0], device=labels.device)
        else:  # "all": every class pooled, then indexed by label (the former computation)
            txt_bridge, bridge_labels = dict(bridge_features(self.clip, ("text",))["text"]), labels
        layers = sorted(set(vis_bridge) & set(txt_bridge))
        txt_frozen = self.teacher_text_features()
        if teacher_features is None:
            teacher_features = self.teacher_image_features(images if teacher_images is None else teacher_images)
        img_frozen = teacher_features.to(img.dtype)
        # The release scales both sides of its distillation and the residual entropies by its
        # trainable scale, gradient included (release/models/drople.py:896-914).
        frozen_logits = scale * img_frozen @ txt_frozen.t()
        _, terms = drople_loss(
            logits, labels, img, txt, img_frozen, txt_frozen, frozen_logits, scale,
            self.epoch if epoch is None else epoch, self.total_epochs if total_epochs is None else total_epochs,
            vis_bridge=[vis_bridge[i] for i in layers], txt_bridge=[txt_bridge[i] for i in layers],
            weights=self.loss_weights, bridge_labels=bridge_labels)
        return logits, terms

    # ----- persistence -----------------------------------------------------

    def prompt_state_dict(self) -> Dict[str, torch.Tensor]:
        """Trainable learner tensors (prompts, logit scale, LoRA), without the CLIP weights or the bridge."""
        return {n: p.detach().clone() for n, p in self.named_parameters()
                if p.requires_grad and not n.startswith("clip.")}

    def load_prompt_state_dict(self, saved: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load :meth:`prompt_state_dict` output; a mismatch raises ValueError naming ``source``."""
        own = dict(self.named_parameters())
        expected = {n for n in own if own[n].requires_grad and not n.startswith("clip.")}
        missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - expected)
        bad = [f"{n}: {tuple(saved[n].shape)} vs {tuple(own[n].shape)}"
               for n in expected & set(saved) if tuple(saved[n].shape) != tuple(own[n].shape)]
        if missing or unexpected or bad:
            raise ValueError(f"{source} does not match this learner: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}, shape mismatch {bad[:4]}")
        with torch.no_grad():
            for n in expected:
                own[n].copy_(saved[n])
