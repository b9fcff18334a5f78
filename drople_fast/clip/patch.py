"""``apply(model, config)`` / ``remove(model)``: IWTD inside an open_clip ViT CLIP, in place.

The patch swaps the classes of the vision tower and of the text encoder for
subclasses whose forward runs the same blocks on memory-efficient attention
with IWTD after the configured layers (ToMe-style), and restores them on
``remove``. No weight is renamed: the model's ``state_dict`` keys and values
are those of the unpatched model. The bridge module is attached as
``model.drople_bridge`` (so its parameters train with the model) but is kept
out of ``model.state_dict()``; save it with :func:`patch_state_dict`.

All per-model state (config, bridge, prompt hook, step counters, the last
forward's bridge features) lives on the model's own :class:`PatchState`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Optional, Protocol

import torch
from torch import nn

from .attention import Layout, anchor_block_forward, block_forward, check_block, xformers_unavailable
from .bridge import BridgeModule
from . import seeds
from .config import IWTDConfig
from ..ops.functional import BridgeInputs, IWTDOutput, break_for_data_dependent_width, compact_fixed, iwtd
from ..ops.primitives import bridge_features as pooled_bridge_features, keep_order
from ..ops.noise import noise_key, perturb
from .tokens import Tokens, start

BRIDGE_ATTR = "drople_bridge"
STATE_ATTR = "_drople_patch"
TOWERS = seeds.TOWERS


class PromptHook(Protocol):
    """What a prompt learner supplies. Either method may return None for "no prompts at this layer".

    ``vision_prompts(layer, batch)`` -> (1 or B, n, D_vision) tokens inserted before block ``layer``.
    At layer 0 they go through the tower's ``ln_pre`` like the patch tokens (the release concatenates
    them before its pre-LayerNorm, release/models/drople.py:753-757); deeper ones go in as given.
    ``text_prompts(layer, batch)`` -> (1 or B, n, D_text). At layer 0 they replace the n placeholder
    tokens that follow SOS in the input ids (and get the positional embedding of those positions).
    """

    def vision_prompts(self, layer: int, batch: int) -> Optional[torch.Tensor]: ...

    def text_prompts(self, layer: int, batch: int) -> Optional[torch.Tensor]: ...


@dataclass
class StepRecord:
    """What one IWTD step of a training forward saw and produced (see :func:`set_step_observer`)."""

    tower: str
    layer: int
    tokens: Tokens  # the block's output going into the step
    replace_next: bool  # the next layer supplies new prompts, so this step removes the current ones
    out: Optional[IWTDOutput] = None  # set once the operator has run; stays None if there was nothing to score


class PatchState:
    def __init__(self, config: IWTDConfig, bridge: BridgeModule, originals: list):
        self.config = config
        self.bridge = bridge
        self.originals = originals  # (module, original class)
        self.hook: Optional[PromptHook] = None
        # per tower, per layer: the IWTDOutput of the last training forward, replaced by its
        # bridge features once bridge_features() has been asked for them
        self.features: dict[str, dict] = {t: {} for t in TOWERS}
        self.counters = {t: torch.zeros((), dtype=torch.int64) for t in TOWERS}
        self.state_hooks: list = []
        self.step_observer: Optional[Callable[[StepRecord], None]] = None

    def __getstate__(self):
        # The last forward's features are transient (and hold autograd graphs): not saved, not copied.
        state = dict(self.__dict__)
        state["features"] = {t: {} for t in TOWERS}
        return state

    def next_seed(self, tower: str, device) -> torch.Tensor:
        """The (1,) int64 step key of this tower's next training forward (:func:`seeds.step_key`)."""
        counter = self.counters[tower]
        counter.add_(1)
        return seeds.step_key(self.config.seed, counter, tower).to(device).reshape(1)


def _state(module) -> PatchState:
    state = getattr(module, STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{type(module).__name__} is not patched by drople_fast; call drople_fast.apply first")
    return state


# --------------------------------------------------------------------------
# one IWTD step after a block
# --------------------------------------------------------------------------


def _iwtd_step(state: PatchState, tokens: Tokens, q, k, tower: str, layer: int, seed, causal: bool,
               replace_next: bool) -> Tokens:
    cfg = state.config
    record = None
    if state.step_observer is not None:
        record = StepRecord(tower, layer, tokens, replace_next)
        state.step_observer(record)
    if tokens.length < 2:  # everything but the anchor is gone: nothing left to score or drop
        return tokens
    bridge_tokens, weight, bias = state.bridge.params_for(tower)
    layer_seed = seeds.layer_key(seed, layer)
    # The patch builds the anchors itself (CLS, or EOS found once per forward): no per-layer value checks,
    # which would each cost a device-to-host sync.
    out = iwtd(q, k, tokens.x, tokens.eligible & tokens.valid, bridge_tokens, weight, bias, tokens.anchor,
               valid=tokens.valid if tokens.padded else None, causal=causal, p_min=cfg.p_min, p_max=cfg.p_max,
               seed=layer_seed, backend=cfg.backend, row_stride=tokens.row_stride, check_values=False)
    state.features[tower][layer] = out  # bridge features are computed when bridge_features() asks
    if record is not None:
        record.out = out
    if cfg.mode == "perturb":
        # The release's noise: one normal per element of each selected token (one fused op). sigma 0 turns it
        # off, as the release's early return does (release/utils/token_importance.py:141); the scores,
        # probabilities and bridge features above are still produced.
        if cfg.sigma > 0:
            tokens.x = perturb(tokens.x, out.drop_mask, noise_key(layer_seed), cfg.sigma,
                               row_stride=tokens.row_stride, backend=cfg.backend)
        return tokens
    # Prompts are re-supplied by the next layer: remove them now rather than in a second gather.
    doomed = tokens.prompt if replace_next else torch.zeros_like(tokens.prompt)
    if cfg.mode == "drop":
        if not replace_next:  # the kernel's own compaction order and counts
            order, count = out.keep_order, out.keep_count
        else:
            order, count = keep_order(out.valid & ~out.drop_mask & ~doomed)
        # The layer's one device-to-host sync: the kept counts, which give the new width and let the
        # next layers run their per-token work on the kept rows (and packed attention) without another.
        break_for_data_dependent_width()  # under fullgraph=True: "use drop_fixed for fullgraph"
        lengths = tuple(count.tolist())
        return tokens.keep_index(order[:, : max(lengths, default=0)], prompts_removed=replace_next, lengths=lengths)
    # drop_fixed: exactly `keep` of the eligible (non-doomed) tokens, static shapes
    out = out._replace(valid=out.valid & ~doomed, eligible=out.eligible & ~doomed)
    n_elig = _static_eligible(tokens, tower, replace_next)
    static = n_elig is not None
    if not static:  # only when the layout differs per sample (text without prompts); costs a host sync
        n_elig = int(out.eligible.sum(dim=1).max())
    budget = cfg.keep_count(n_elig) if n_elig > 0 else 0
    doomed_count = tokens.num_prompts if replace_next else 0
    num_always = tokens.length - n_elig - doomed_count
    index = compact_fixed(tokens.x, out, keep=budget, num_always=num_always, seed=layer_seed,
                          row_stride=tokens.row_stride, check_values=False).index
    # Every sample keeps all its valid non-eligible, non-doomed tokens and `budget` of its n_elig eligible
    # ones, so the lengths follow on the host when the layout is static (no sync).
    lengths = tokens._shifted(-(doomed_count + n_elig - budget)) if static else None
    return tokens.gather(index, prompts_removed=replace_next, padded=tokens.padded, lengths=lengths)


def _decisions_read(state: PatchState, tokens: Tokens, tower: str, replace_next: bool) -> bool:
    """Whether anything reads this IWTD layer's scores and drop mask.

    Not in the prompted text tower before a layer that supplies new prompts, in "perturb" and "drop":
    its eligible tokens are the prompts only (prompt learner), and the next layer replaces every one of
    them, so whatever the mask drops or perturbs never reaches the tower's output. The alignment loss
    still reads the layer's bridge features; a step observer still sees the operator run.
    """
    return not (replace_next and tower == "text" and not tokens.free_eligible
                and state.config.mode in ("perturb", "drop") and state.step_observer is None)


def _prompts_replaced_step(state: PatchState, tokens: Tokens, tower: str, layer: int) -> Tokens:
    """An IWTD layer whose decisions nothing reads (:func:`_decisions_read`): what the operator's path
    would give, without it -- the bridge inputs for the alignment loss and, in "drop", the layout
    without the prompts (the same tokens, width and lengths as compacting by any mask; no host sync
    where the lengths are known; ``trimmed`` ends as after a compaction, so later Philox draws are
    unchanged). In "perturb" the noise would land on the prompts only: the layout is unchanged."""
    bridge_tokens, weight, bias = state.bridge.params_for(tower)
    state.features[tower][layer] = BridgeInputs(tokens.valid, (tokens.x, bridge_tokens, weight, bias))
    if state.config.mode == "perturb":
        return tokens
    base = tokens.without_prompts()
    if base.lengths is not None and base.length == max(base.lengths, default=0):
        return replace(base, trimmed=0)
    # lengths not known on the host (no EOS trimming), or a wider layout: compact as the operator's path
    # does, to the longest kept row (one host sync)
    return tokens.keep(tokens.valid & ~tokens.prompt, prompts_removed=True)


def _static_eligible(tokens: Tokens, tower: str, replace_next: bool) -> Optional[int]:
    """Eligible tokens per sample when the layout makes it the same for all (static shapes)."""
    if tokens.scattered and replace_next:
        return None
    doomed = tokens.num_prompts if replace_next else 0
    if tower == "vision" and not tokens.padded:
        return tokens.length - 1 - doomed  # every token but CLS
    if tower == "text" and not tokens.free_eligible and not tokens.scattered:
        return tokens.num_prompts - doomed  # only the prompt tokens
    return None


def _real_rows(tokens: Tokens) -> torch.Tensor:
    """Flat indices (into B * S) of the valid rows; no host sync when their count is known."""
    flat = tokens.valid.reshape(-1)
    if tokens.real is None:
        return flat.nonzero().squeeze(1)  # a host sync (its size is data-dependent)
    return torch.nonzero_static(flat, size=tokens.real).squeeze(1)


def _run_blocks(state: PatchState, training: bool, blocks, tokens: Tokens, tower: str, causal: bool,
                prompts_at: Callable[[int], Optional[torch.Tensor]], anchors_only: bool = False) -> Tokens:
    """Run ``blocks`` over ``tokens`` with prompts and IWTD. ``anchors_only``: the caller pools the anchor
    rows alone, so the last block (unless it is an IWTD layer) runs for them only
    (:func:`anchor_block_forward`) and the result is their one-token layout."""
    cfg = state.config
    active = training and cfg.mode != "off"
    layers = set(cfg.vision_layers if tower == "vision" else cfg.text_layers) if active else set()
    seed = state.next_seed(tower, tokens.x.device) if layers else None
    if active:
        state.features[tower] = {}
    upcoming = prompts_at(0)
    rows_of = (None, None)  # (valid mask, its flat real-row indices), recomputed when the layout changes
    for i, block in enumerate(blocks):
        if upcoming is not None and i > 0:
            tokens = tokens.with_prompts(upcoming)
        upcoming = prompts_at(i + 1) if i + 1 < len(blocks) else None
        # Padded batches run their per-token layers on the real rows only (static shapes stay padded
        # while compiling: the row count is data-dependent).
        rows = None
        if tokens.padded and not torch.compiler.is_compiling():
            if rows_of[0] is not tokens.valid:
                rows_of = (tokens.valid, _real_rows(tokens))
            rows = rows_of[1]
        layout = Layout(valid=tokens.valid if tokens.padded else None, causal=causal, lengths=tokens.lengths,
                        rows=rows)
        if anchors_only and i == len(blocks) - 1 and i not in layers:
            return tokens.anchors_only(anchor_block_forward(block, tokens.x, tokens.anchor, layout, cfg.attention))
        if i in layers and _decisions_read(state, tokens, tower, upcoming is not None):
            tokens.x, q, k = block_forward(block, tokens.x, layout, cfg.attention, return_qk=True)
            tokens = _iwtd_step(state, tokens, q, k, tower, i, seed, causal, upcoming is not None)
        else:
            tokens.x = block_forward(block, tokens.x, layout, cfg.attention)
            if i in layers:
                tokens = _prompts_replaced_step(state, tokens, tower, i)
    return tokens


# --------------------------------------------------------------------------
# towers
# --------------------------------------------------------------------------


def _rebuild_patched(original: type, mixin: type):
    """Unpickling: an empty instance of the patched class of ``original`` (recreated if needed)."""
    cls = _patched_class(original, mixin)
    return cls.__new__(cls)


class _PicklablePatch:
    """Patched classes are made at run time, so pickle cannot name them: pickle the original class
    and the mixin instead (``torch.save(model)`` and ``copy.deepcopy`` of a patched model work)."""

    def __reduce_ex__(self, protocol):
        reduced = super().__reduce_ex__(protocol)
        cls = type(self)
        return (_rebuild_patched, (cls._drople_original, cls._drople_mixin)) + tuple(reduced[2:])


class DropleVisionTransformer(_PicklablePatch):
    """Mixin over open_clip's VisionTransformer."""

    # Mirrors open_clip 3.3.0 VisionTransformer.forward (_embeds, transformer, _pool, proj); differs in: the
    # blocks run through _run_blocks (visual prompts after CLS, IWTD and token removal after the chosen layers).
    def forward(self, x: torch.Tensor):
        state = _state(self)
        hook = state.hook
        x = self._embeds(x)
        B, S, _ = x.shape
        eligible = torch.arange(S, device=x.device) > 0  # every token but CLS
        tokens = start(x, eligible, torch.zeros(B, dtype=torch.int64, device=x.device))
        prompts_at = (lambda i: hook.vision_prompts(i, B)) if hook is not None else (lambda i: None)
        first = prompts_at(0)
        if first is not None:
            # LayerNorm is per token, so normalising the prompts apart from the sequence equals the
            # release's normalising them inside it; only where they sit differs (attention does not care).
            tokens = tokens.with_prompts(self.ln_pre(first.to(x.dtype)))
        tokens = _run_blocks(state, self.training, self.transformer.resblocks, tokens, "vision", False, prompts_at)
        pooled, out_tokens = self._pool(tokens.x)
        if self.proj is not None:
            pooled = pooled @ self.proj
        if self.output_tokens:
            return pooled, out_tokens
        return pooled


def _eos_positions(text: torch.Tensor, pool_type: str, eos_id) -> torch.Tensor:
    if pool_type == "argmax":
        return text.argmax(dim=-1)
    if pool_type == "eos":
        return (text == eos_id).to(torch.int64).argmax(dim=-1)
    raise ValueError(f"text pool type {pool_type!r} is not supported (need 'argmax' or 'eos')")


def encode_text_tokens(owner, text: torch.Tensor, training: bool, pool_type: str, eos_id) -> torch.Tensor:
    """The text tower of ``owner`` (a CLIP or a TextTransformer) with prompts, IWTD and EOS trimming.

    Mirrors open_clip 3.3.0 ``CLIP.encode_text`` / ``TextTransformer.forward`` (token + positional
    embedding, causal transformer, ln_final, pool at the EOS / argmax token, text_projection); differs in:
    the batch is cut after its last EOS (causal: the pooled tokens cannot see what follows), learned
    context replaces positions 1..n_ctx, keys after each sample's EOS are masked as padding, IWTD may
    remove tokens, the last block computes the EOS rows only, and CoCa's class token and ``output_tokens`` are not supported.
    """
    state = _state(owner)
    hook = state.hook
    cast_dtype = owner.transformer.get_cast_dtype()
    eos = _eos_positions(text, pool_type, eos_id)
    full_length = text.shape[1]
    lengths = None
    if state.config.eos_trim and not torch.compiler.is_compiling():
        # Causal attention: nothing after the last EOS can reach any pooled token. The forward's one
        # host read before the blocks: every prompt's length (the longest gives the trimmed width).
        lengths = tuple((eos + 1).tolist())
        text = text[:, : max(lengths, default=1)]
    B, S = text.shape
    x = owner.token_embedding(text).to(cast_dtype) + owner.positional_embedding[:S].to(cast_dtype)
    positions = torch.arange(S, device=x.device)
    valid = positions[None, :] <= eos[:, None]
    first = hook.text_prompts(0, B) if hook is not None else None
    n_ctx = first.shape[1] if first is not None else 0
    placeholder = (positions >= 1) & (positions <= n_ctx)
    # Without a prompt learner every word token between SOS and EOS may be dropped.
    free = first is None
    eligible = valid & (positions[None, :] > 0) & (positions[None, :] < eos[:, None]) if free else \
        torch.zeros_like(valid)
    tokens = start(x, eligible, eos, valid=valid, prompt=placeholder.expand(B, S), num_prompts=n_ctx, lengths=lengths)
    tokens.padded = True
    tokens.free_eligible = free
    tokens.trimmed = full_length - S
    if first is not None:
        first = first.to(cast_dtype) + owner.positional_embedding[1:1 + n_ctx].to(cast_dtype)
        tokens = tokens.with_prompts(first)
    prompts_at = (lambda i: hook.text_prompts(i, B)) if hook is not None else (lambda i: None)
    # only the EOS row is pooled: the last block runs for it alone (keys and values from every token)
    tokens = _run_blocks(state, training, owner.transformer.resblocks, tokens, "text", True, prompts_at,
                         anchors_only=True)
    x = owner.ln_final(tokens.x)
    pooled = x[torch.arange(B, device=x.device), tokens.anchor]
    proj = owner.text_projection
    if proj is not None:
        pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
    return pooled


class DropleTextTransformer(_PicklablePatch):
    """Mixin over open_clip's TextTransformer (CustomTextCLIP.text)."""

    def forward(self, text):
        pooled = encode_text_tokens(self, text, self.training, self.pool_type, getattr(self, "eos_id", None))
        if self.output_tokens:
            raise ValueError("output_tokens is not supported by the drople_fast text tower")
        return pooled


class DropleCLIP(_PicklablePatch):
    """Mixin over open_clip's CLIP, whose text tower lives on the model itself."""

    def encode_text(self, text, normalize: bool = False):
        x = encode_text_tokens(self, text, self.training, self.text_pool_type, getattr(self, "text_eos_id", None))
        return nn.functional.normalize(x, dim=-1) if normalize else x


# --------------------------------------------------------------------------
# apply / remove
# --------------------------------------------------------------------------

_PATCHED_CLASSES: dict[tuple[type, type], type] = {}


def _patched_class(cls: type, mixin: type) -> type:
    key = (cls, mixin)
    if key not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[key] = type(f"Drople{cls.__name__}", (mixin, cls),
                                     {"_drople_original": cls, "_drople_mixin": mixin})
    return _PATCHED_CLASSES[key]


def text_tower(model: nn.Module) -> nn.Module:
    """The module that owns the text transformer, token embedding and ln_final: ``model.text`` for
    open_clip's CustomTextCLIP (a TextTransformer), ``model`` itself for the classic CLIP."""
    text = getattr(model, "text", None)
    return text if text is not None and hasattr(text, "token_embedding") else model


def _towers(model: nn.Module):
    """(vision module, text owner, text mixin) after checking the model is a supported ViT CLIP."""
    from open_clip.transformer import TextTransformer, VisionTransformer

    name = type(model).__name__
    if getattr(model, STATE_ATTR, None) is not None:
        raise ValueError(f"{name} is already patched by drople_fast; call drople_fast.remove first")
    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"{name}: drople_fast supports open_clip ViT towers, got visual="
                         f"{type(visual).__name__} (ResNet and timm towers are not supported)")
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise ValueError(f"{name}: only CLS-token pooling is supported, got pool_type={visual.pool_type!r}"
                         f"{' with an attention pooler' if visual.attn_pool is not None else ''}")
    owner = text_tower(model)
    if isinstance(owner, TextTransformer):
        if owner.cls_emb is not None:
            raise ValueError(f"{name}: text towers with a class token (CoCa) are not supported")
        mixin, pool = DropleTextTransformer, owner.pool_type
    elif owner is model and hasattr(model, "transformer") and hasattr(model, "token_embedding"):
        mixin, pool = DropleCLIP, getattr(model, "text_pool_type", "argmax")
    else:
        raise ValueError(f"{name}: no supported open_clip text tower found")
    if pool not in ("argmax", "eos"):
        raise ValueError(f"{name}: text pool type {pool!r} is not supported (need 'argmax' or 'eos')")
    for tower, blocks in (("vision", visual.transformer.resblocks), ("text", owner.transformer.resblocks)):
        for i, block in enumerate(blocks):
            check_block(block, f"{name} {tower} block {i}")
    return visual, owner, mixin


def apply(model: nn.Module, config: Optional[IWTDConfig] = None) -> nn.Module:
    """Patch ``model`` in place (and return it). Raises ValueError for unsupported models or layers."""
    config = IWTDConfig() if config is None else config
    visual, owner, text_mixin = _towers(model)
    depth = {"vision": len(visual.transformer.resblocks), "text": len(owner.transformer.resblocks)}
    for tower, layers in (("vision", config.vision_layers), ("text", config.text_layers)):
        bad = [i for i in layers if not 0 <= i < depth[tower]]
        if bad:
            raise ValueError(f"{tower}_layers {bad} out of range for a {depth[tower]}-layer {tower} tower")
    if config.attention == "xformers":
        device = next(model.parameters()).device
        reason = xformers_unavailable(device)
        if reason:
            raise ValueError(f"attention='xformers' refused: {reason}")
    vision_width = visual.transformer.width
    text_width = owner.transformer.width
    param = next(model.parameters())
    bridge = BridgeModule(vision_width, text_width, config.bridge_tokens, config.bridge_dim)
    bridge.to(device=param.device)
    originals = [(visual, type(visual)), (owner, type(owner))]
    state = PatchState(config, bridge, originals)
    visual.__class__ = _patched_class(type(visual), DropleVisionTransformer)
    owner.__class__ = _patched_class(type(owner), text_mixin)
    for module in {id(m): m for m in (model, visual, owner)}.values():
        object.__setattr__(module, STATE_ATTR, state)
    model.add_module(BRIDGE_ATTR, bridge)
    state.state_hooks = [
        model._register_state_dict_hook(_hide_bridge),
        model.register_load_state_dict_post_hook(_forgive_missing_bridge),
    ]
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: original classes back, bridge and state gone."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by drople_fast; nothing to remove")
    for module, cls in state.originals:
        module.__class__ = cls
    for module in {id(m): m for m, _ in state.originals}.values():
        if STATE_ATTR in module.__dict__:
            object.__delattr__(module, STATE_ATTR)
    if STATE_ATTR in model.__dict__:
        object.__delattr__(model, STATE_ATTR)
    for handle in state.state_hooks:
        handle.remove()
    del model._modules[BRIDGE_ATTR]
    return model


def _hide_bridge(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + BRIDGE_ATTR + ".")]:
        del state_dict[key]
    return state_dict


def _forgive_missing_bridge(module, incompatible):
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(BRIDGE_ATTR + ".")]


# --------------------------------------------------------------------------
# accessors
# --------------------------------------------------------------------------


def is_patched(model: nn.Module) -> bool:
    return getattr(model, STATE_ATTR, None) is not None


def get_state(model: nn.Module) -> PatchState:
    return _state(model)


def set_prompt_hook(model: nn.Module, hook: Optional[PromptHook]) -> None:
    """Install the object that supplies per-layer prompt tokens (None removes it)."""
    _state(model).hook = hook


def set_step_observer(model: nn.Module, observer: Optional[Callable[[StepRecord], None]]) -> None:
    """Call ``observer(record)`` at the start of every IWTD step of the model's training forwards, for tests
    and diagnostics (None removes it). ``record.out`` is filled in once the operator has run. The observer
    may replace ``record.tokens.x`` by an equal tensor (e.g. ``x + zero`` to take gradients there); any
    other change alters the forward. With an observer every IWTD layer runs the operator, including the
    text layers whose decisions nothing reads (:func:`_decisions_read`), which it otherwise skips."""
    _state(model).step_observer = observer


def bridge_features(model: nn.Module, towers: Sequence[str] = TOWERS) -> dict[str, dict[int, torch.Tensor]]:
    """Per tower, per IWTD layer, the (batch, M, P) bridge features of the last training forward.

    They are computed on the first call after a forward (and kept), so training without the
    alignment loss never pays for them; only ``towers``' are computed and returned.
    """
    features = _state(model).features
    for tower in towers:
        per_layer = features[tower]
        for layer, value in per_layer.items():
            if isinstance(value, (IWTDOutput, BridgeInputs)):
                per_layer[layer] = value.bridge_features
    return {tower: features[tower] for tower in towers}


def bridge_features_of(model: nn.Module, tower: str, rows: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per IWTD layer of ``tower``, the (len(rows), M, P) bridge features of the last training forward's
    samples ``rows`` only (for the text tower: the classes a loss reads, not all of them).

    Pooling is per sample, so each row equals the same row of :func:`bridge_features`; the IWTD step
    that produced the inputs (scores, drops) saw every sample. Not kept: a second call recomputes.
    """
    out = {}
    for layer, value in _state(model).features[tower].items():
        if isinstance(value, (IWTDOutput, BridgeInputs)):
            if not value.bridge_inputs:
                raise ValueError("this IWTDOutput was built without bridge inputs")
            hidden, bridge_tokens, weight, bias = value.bridge_inputs
            out[layer] = pooled_bridge_features(hidden.index_select(0, rows), bridge_tokens, weight, bias,
                                                value.valid.index_select(0, rows))
        else:  # bridge_features() already pooled every sample
            out[layer] = value.index_select(0, rows)
    return out


def patch_state_dict(model: nn.Module) -> dict:
    """What the patch adds to a checkpoint: bridge weights and the IWTD step counters."""
    state = _state(model)
    return {"bridge": state.bridge.state_dict(), "counters": {t: int(c) for t, c in state.counters.items()}}


def load_patch_state_dict(model: nn.Module, saved: dict) -> None:
    """Restore what :func:`patch_state_dict` saved; a malformed dict is a ValueError naming what is wrong."""
    state = _state(model)
    if not isinstance(saved, dict):
        raise ValueError(f"a patch state dict must be a dict, got {type(saved).__name__}")
    missing = [k for k in ("bridge", "counters") if k not in saved]
    if missing:
        raise ValueError(f"patch state dict lacks {missing} (save it with drople_fast.patch_state_dict)")
    counters = saved["counters"]
    if not isinstance(counters, dict) or set(counters) != set(TOWERS) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counters.values()):
        raise ValueError(f"patch state dict counters must map {TOWERS} to ints >= 0, got {counters!r}")
    state.bridge.load_state_dict(saved["bridge"])
    for tower, value in counters.items():
        state.counters[tower].fill_(value)
