"""The DroPLe prompt learner over a patched open_clip ViT CLIP (DESIGN §1).

:class:`DroPLe` owns the learnable parts and nothing else trains:

* text context: 4 tokens initialised from the token embeddings of "a photo of
  a"; deep: a fresh learnable context for every text layer 0..8 (layers >= 1
  drawn from N(0, 0.02));
* visual prompts: 4 tokens for every vision layer 0..5, N(0, 0.02);
* optional LoRA (rank 8) on the q and v projections of vision layers 6..11;
* the IWTD bridge that :func:`drople_fast.apply` attaches to the model.

LoRA does not rename or wrap any weight: the attention module's class is
swapped for a subclass whose ``in_proj_weight`` property returns the stored
weight plus ``B @ A`` on the q and v rows, so ``model.state_dict()`` keeps
open_clip's keys (and pretrained checkpoints still load) and the patched
blocks, which read ``block.attn.in_proj_weight``, see the adapted weight. The
LoRA factors live on the learner, not on the CLIP model.

The frozen CLIP teacher is the same model run with the prompt hook removed,
LoRA disabled, in eval mode (so IWTD is inactive) and without grad. Its class
text features are computed once per class list and cached; its image
features are computed per batch.

Class prompts for the learner are ``"X X X X {classname}."``: the patch
replaces the placeholders after SOS with the layer-0 context. The teacher's
text features average hand-written templates (CoOp's per-dataset template
plus a small ensemble) and, optionally, class descriptions from a JSON file
(``{"classname": ["description", ...]}``) such as a language model writes;
the file is never required.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..clip.config import IWTDConfig
from .jsonio import read_json
from .losses import LossWeights, drople_loss
from ..clip.patch import apply, bridge_features, get_state, is_patched, set_prompt_hook

CTX_INIT = "a photo of a"
PLACEHOLDER = "X"

# CoOp's per-dataset templates (the teacher's first template).
DATASET_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "Flowers102": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DTD": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}
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


class LoRA(nn.Module):
    """Rank-r update of the q and v rows of a packed (3D, D) in-projection weight."""

    def __init__(self, dim: int, rank: int = 8, alpha: Optional[float] = None):
        super().__init__()
        self.dim, self.rank = dim, rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.q_a = nn.Parameter(torch.randn(rank, dim) / rank)
        self.q_b = nn.Parameter(torch.zeros(dim, rank))
        self.v_a = nn.Parameter(torch.randn(rank, dim) / rank)
        self.v_b = nn.Parameter(torch.zeros(dim, rank))
        self.enabled = True

    def delta(self) -> torch.Tensor:
        zero = self.q_a.new_zeros(self.dim, self.dim)
        return torch.cat([self.q_b @ self.q_a, zero, self.v_b @ self.v_a], dim=0) * self.scale


class _LoRAAttention:
    """Mixin: ``in_proj_weight`` = stored weight + the attached LoRA's delta (state_dict unchanged)."""

    @property
    def in_proj_weight(self):
        weight = self._parameters["in_proj_weight"]
        lora = self.__dict__.get("_drople_lora")
        if lora is None or not lora.enabled:
            return weight
        return weight + lora.delta().to(weight.dtype)


_LORA_CLASSES: Dict[type, type] = {}


def attach_lora(attn: nn.Module, lora: LoRA) -> None:
    cls = type(attn)
    if cls not in _LORA_CLASSES:
        _LORA_CLASSES[cls] = type(f"LoRA{cls.__name__}", (_LoRAAttention, cls), {"_drople_original": cls})
    attn.__class__ = _LORA_CLASSES[cls]
    object.__setattr__(attn, "_drople_lora", lora)  # not a registered submodule: keys stay open_clip's


def detach_lora(attn: nn.Module) -> None:
    original = getattr(type(attn), "_drople_original", None)
    if original is not None and issubclass(type(attn), _LoRAAttention):
        attn.__class__ = original
    attn.__dict__.pop("_drople_lora", None)


# --------------------------------------------------------------------------
# the learner
# --------------------------------------------------------------------------


def _text_owner(model: nn.Module) -> nn.Module:
    text = getattr(model, "text", None)
    return text if text is not None and hasattr(text, "token_embedding") else model


class DroPLe(nn.Module):
    """Deep vision-language prompts + optional LoRA over a patched (frozen) open_clip CLIP.

    ``forward(images, labels=None, epoch=None, total_epochs=None)`` returns
    the (B, C) logits over the current class list (:meth:`set_classnames`);
    in training mode with labels it returns ``(logits, loss_terms)`` where
    ``loss_terms["total"]`` is the DroPLe loss of :func:`drople_fast.training.losses.drople_loss`
    at ``epoch`` of ``total_epochs`` (default: :meth:`set_epoch`'s values).
    """

    def __init__(self, model: nn.Module, classnames: Optional[Sequence[str]] = None,
                 iwtd: Optional[IWTDConfig] = None, n_ctx: int = 4, ctx_init: str = CTX_INIT,
                 text_depth: int = 9, n_vis: int = 4, vision_depth: int = 6, lora_rank: int = 0,
                 lora_layers: Optional[Sequence[int]] = None, dataset: Optional[str] = None,
                 templates: Optional[Sequence[str]] = None, descriptions: Optional[str | Dict] = None,
                 loss_weights: Optional[LossWeights] = None):
        super().__init__()
        if not is_patched(model):
            apply(model, iwtd if iwtd is not None else IWTDConfig())
        self.clip = model
        self.loss_weights = loss_weights or LossWeights()
        owner = _text_owner(model)
        self._owner = [owner]  # not a submodule (it is model or model.text already)
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

        # text context: layer 0 from "a photo of a", deeper layers N(0, 0.02)
        with torch.no_grad():
            ids = _tokenize([ctx_init], self.context_length).to(owner.token_embedding.weight.device)
            words = len(ctx_init.split())
            emb = owner.token_embedding(ids)[0, 1:1 + words].float()
        if words != n_ctx:
            raise ValueError(f"ctx_init {ctx_init!r} has {words} words but n_ctx={n_ctx}")
        dev = emb.device
        self.text_ctx = nn.ParameterList([nn.Parameter(emb.clone())] + [
            nn.Parameter(torch.randn(n_ctx, text_width, device=dev) * 0.02) for _ in range(text_depth - 1)])
        self.vision_ctx = nn.ParameterList([
            nn.Parameter(torch.randn(n_vis, vision_width, device=dev) * 0.02) for _ in range(vision_depth)])

        # LoRA on q/v of vision layers 6..11 (the layers after the prompted ones)
        self.lora = nn.ModuleDict()
        if lora_rank > 0:
            layers = tuple(lora_layers) if lora_layers is not None else tuple(range(6, n_vis_layers))
            for i in layers:
                if not 0 <= i < n_vis_layers:
                    raise ValueError(f"LoRA layer {i} out of range for a {n_vis_layers}-layer vision tower")
                lora = LoRA(vision_width, lora_rank).to(dev)
                attach_lora(model.visual.transformer.resblocks[i].attn, lora)
                self.lora[str(i)] = lora

        self.dataset = dataset
        self.templates = list(templates) if templates else templates_for(dataset)
        if isinstance(descriptions, str):
            descriptions = load_descriptions(descriptions)
        self.descriptions = descriptions or {}
        self._teacher_cache: Dict[tuple, torch.Tensor] = {}
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
        prompts = [" ".join([PLACEHOLDER] * self.n_ctx) + f" {n}." for n in names]
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

    def clear_teacher_cache(self) -> None:
        self._teacher_cache.clear()

    def teacher_text_features(self, classnames: Optional[Sequence[str]] = None) -> torch.Tensor:
        """(C, D) unit-normalised frozen-CLIP class features, averaged over templates and
        optional descriptions; computed once per class list."""
        classnames = list(classnames if classnames is not None else self.classnames)
        device = self.text_ctx[0].device
        key = (tuple(classnames), str(device))
        cached = self._teacher_cache.get(key)
        if cached is not None:
            return cached
        feats = []
        with self.teacher_mode():
            for name in classnames:
                text = name.replace("_", " ")
                sentences = [t.format(text) for t in self.templates] + list(self.descriptions.get(name, []))
                ids = _tokenize(sentences, self.context_length).to(device)
                z = F.normalize(self.clip.encode_text(ids).float(), dim=-1).mean(0)
                feats.append(F.normalize(z, dim=-1))
        out = torch.stack(feats)
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

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().float()

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale() * image_features @ text_features.t()

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                epoch: Optional[float] = None, total_epochs: Optional[float] = None):
        txt = self.text_features()
        txt_bridge = dict(bridge_features(self.clip)["text"]) if self.training else {}
        img = self.image_features(images)
        logits = self.logits(img, txt)
        if not self.training or labels is None:
            return logits
        vis_bridge = dict(bridge_features(self.clip)["vision"])
        layers = sorted(set(vis_bridge) & set(txt_bridge))
        txt_frozen = self.teacher_text_features()
        img_frozen = self.teacher_image_features(images)
        scale = self.logit_scale()
        frozen_logits = scale.detach() * img_frozen @ txt_frozen.t()
        _, terms = drople_loss(
            logits, labels, img, txt, img_frozen, txt_frozen, frozen_logits, scale.detach(),
            self.epoch if epoch is None else epoch, self.total_epochs if total_epochs is None else total_epochs,
            vis_bridge=[vis_bridge[i] for i in layers], txt_bridge=[txt_bridge[i] for i in layers],
            weights=self.loss_weights)
        return logits, terms

    # ----- persistence -----------------------------------------------------

    def prompt_state_dict(self) -> Dict[str, torch.Tensor]:
        """Trainable learner tensors (prompts, LoRA), without the CLIP weights or the bridge."""
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

    def remove_lora(self) -> None:
        """Detach LoRA from the attention modules (the CLIP is left exactly as before)."""
        for i in list(self.lora.keys()):
            detach_lora(self.clip.visual.transformer.resblocks[int(i)].attn)
