"""Load pretrained CLIP weights from local files into an open_clip model.

Three formats are recognised (nothing is ever downloaded):

(a) open_clip checkpoints: a ``torch.save``'d state dict (``.pt``/``.bin``/
    ``.pth``), a dict holding it under ``"state_dict"`` (open_clip's training
    checkpoints), or a ``.safetensors`` file; ``module.`` prefixes (DDP) are
    stripped.
(b) OpenAI's TorchScript archives (``ViT-B-16.pt``): as in open_clip's
    ``load_openai_model``, the archive is ``torch.jit.load``-ed and its
    ``state_dict()`` used; OpenAI's names already are open_clip's ``CLIP``
    names, once the ``input_resolution``/``context_length``/``vocab_size``
    entries are dropped. The archive's fp16 weights are cast to the model's
    dtype.
(c) A Hugging Face CLIP folder (``config.json`` + ``model.safetensors``, a
    sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``),
    converted by :func:`hf_to_open_clip`.

Loading is all-or-nothing: the checkpoint is read, converted and checked
against ``model.state_dict()`` (names and shapes) before anything is written,
so on any error the model is unchanged. Only weights are transferred; the
activation (QuickGELU for OpenAI-trained weights) is a property of how the
model was built, and a mismatch with an HF config is warned about.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
import zipfile
from typing import Dict, Tuple

import torch

from .fileio import read_json

# Entries in OpenAI archives that are not weights (open_clip drops them too).
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def _unreadable(path: str, exc: BaseException) -> ValueError:
    return ValueError(f"{path} is not a readable checkpoint: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------
# Hugging Face CLIPModel <-> open_clip CLIP names
#
# The HF names follow transformers' CLIPModel (modeling_clip.py): CLIPVision/
# TextEmbeddings, CLIPEncoderLayer (self_attn.{q,k,v,out}_proj, layer_norm1/2,
# mlp.fc1/fc2), pre_layrnorm (sic), post_layernorm, final_layer_norm, and the
# bias-free visual_projection / text_projection Linear layers.

# (open_clip residual-block prefix, HF tower prefix) for the vision and text towers
_TOWERS = (("visual.transformer.resblocks.", "vision_model."), ("transformer.resblocks.", "text_model."))

_BLOCK_RENAMES = {  # open_clip suffix -> HF suffix inside one residual block
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}

_PLAIN_RENAMES = {  # open_clip name -> HF name (same tensor)
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}

_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


def hf_to_open_clip(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """HF ``CLIPModel`` names -> open_clip ``CLIP`` names (tests/hf_clip.py holds the
    inverse, to write test archives). ``position_ids`` buffers are dropped; other
    unknown keys are passed through so the architecture check reports them."""
    plain = {v: k for k, v in _PLAIN_RENAMES.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    block = {v: k for k, v in _BLOCK_RENAMES.items()}
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if key in plain:
            out[plain[key]] = value
            continue
        if key in transposed:
            out[transposed[key]] = value.t()
            continue
        for block_prefix, hf_prefix in _TOWERS:
            m = re.fullmatch(re.escape(hf_prefix) + r"encoder\.layers\.(\d+)\.(.+)", key)
            if not m:
                continue
            layer, suffix = m.groups()
            q = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", suffix)
            if q:
                qkv.setdefault((f"{block_prefix}{layer}.attn.in_proj_", q.group(2)), {})[q.group(1)] = value
            elif suffix in block:
                out[f"{block_prefix}{layer}.{block[suffix]}"] = value
            else:
                out[key] = value
            break
        else:
            out[key] = value
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"Hugging Face checkpoint has only {sorted(parts)} projections for {prefix}{kind}")
        out[prefix + kind] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _is_hf(state_dict: Dict) -> bool:
    return any(k.startswith(("vision_model.", "text_model.")) for k in state_dict)


# --------------------------------------------------------------------------
# reading files

def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise _unreadable(path, exc) from exc


def _is_torchscript(path: str) -> bool:
    """TorchScript archives are zips with a ``code/`` folder; torch.save zips have none."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _read_file(path: str, weights_only: bool) -> Tuple[Dict, str]:
    if path.endswith(".safetensors"):
        return _read_safetensors(path), "open_clip"
    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated upstream, but it is the only way to read OpenAI's files
                warnings.simplefilter("ignore", FutureWarning)
                archive = torch.jit.load(path, map_location="cpu")
        except Exception as exc:
            raise _unreadable(path, exc) from exc
        return dict(archive.state_dict()), "openai_torchscript"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # truncated zips, bad pickles, non-weights objects
        raise _unreadable(path, exc) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj, "open_clip"


def _read_hf_folder(folder: str) -> Dict[str, torch.Tensor]:
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"Hugging Face CLIP folder has no config.json: {config}")
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    bin_file = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(single):
        return _read_safetensors(single)
    if os.path.isfile(index):
        try:
            shards = sorted(set(read_json(index, "safetensors index")["weight_map"].values()))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index} is not a valid safetensors index: {exc}") from exc
        out: Dict[str, torch.Tensor] = {}
        for shard in shards:
            shard_path = os.path.join(folder, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"shard listed in {index} not found: {shard_path}")
            out.update(_read_safetensors(shard_path))
        return out
    if os.path.isfile(bin_file):
        return _read_file(bin_file, weights_only=True)[0]
    raise FileNotFoundError(f"no weights in Hugging Face CLIP folder {folder}: expected {single} or {bin_file}")


def _read_hf_config(folder: str) -> Dict:
    return read_json(os.path.join(folder, "config.json"), "Hugging Face config")


def _activation(model: torch.nn.Module) -> str:
    return "quick_gelu" if type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU" else "gelu"


# --------------------------------------------------------------------------
# messages

# open_clip.create_model(..., pretrained=None) logs this on the root logger; the project builds models that
# way and loads local weights itself (or, for the test-sized CLIP, means random weights), so it misleads.
_OPEN_CLIP_RANDOM_INIT = "No pretrained weights loaded for model"


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_OPEN_CLIP_RANDOM_INIT)


@contextlib.contextmanager
def quiet_random_init():
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" while building a model
    whose weights this project loads itself (every other open_clip message still shows)."""
    root, flt = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def missing_weights_message(path: str) -> str:
    """``--pretrained`` names local files only: a missing path (an open_clip tag such as ``openai`` among
    them) gets an error that says so."""
    return (f"pretrained weights not found: {path} (--pretrained takes a local file or folder only: nothing "
            "downloads, so open_clip tags such as 'openai' or 'laion2b_s34b_b88k' do not work; download the "
            "weights once and pass the file)")


def random_weights_warning(model: str) -> str:
    return (f"drople-fast: WARNING: --model {model} without --pretrained trains from RANDOM weights: prompt "
            "learning needs a pretrained CLIP, expect near-chance accuracy; pass --pretrained FILE (local "
            "open_clip / OpenAI / Hugging Face weights)")


# --------------------------------------------------------------------------
# public API

def read_state_dict(path: str, weights_only: bool = True) -> Tuple[Dict[str, torch.Tensor], str]:
    """Read any supported checkpoint into open_clip names; returns (state dict, format)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(missing_weights_message(path))
    if os.path.isdir(path):
        sd, fmt = _read_hf_folder(path), "hf"
    else:
        sd, fmt = _read_file(path, weights_only)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries {bad[:5]} are not tensors; not a state dict")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    for key in _OPENAI_EXTRA_KEYS:
        sd.pop(key, None)
    if _is_hf(sd):
        sd, fmt = hf_to_open_clip(sd), "hf"
    return sd, fmt


def check_compatible(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """ValueError listing a few missing/unexpected keys and shape mismatches."""
    target = model.state_dict()
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in state_dict and state_dict[k].shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label} {len(items)}: {items[:5]}{more}")
        raise ValueError(f"{source} does not match the model's architecture; " + "; ".join(parts))


def load_pretrained(model: torch.nn.Module, path: str, weights_only: bool = True) -> str:
    """Load local weights at ``path`` into ``model`` (all-or-nothing).

    Returns the detected format: "open_clip", "openai_torchscript" or "hf".
    Raises FileNotFoundError for a missing file/folder, ValueError for an
    unreadable file or a checkpoint of a different architecture.
    ``weights_only`` is passed to ``torch.load`` (pickles holding arbitrary
    objects are refused by default).
    """
    path = os.fspath(path)
    sd, fmt = read_state_dict(path, weights_only)
    target = model.state_dict()
    # open_clip stores logit_scale as 0-d; some exports use shape (1,).
    if "logit_scale" in sd and "logit_scale" in target and sd["logit_scale"].numel() == target["logit_scale"].numel():
        sd["logit_scale"] = sd["logit_scale"].reshape(target["logit_scale"].shape)
    check_compatible(model, sd, path)
    if fmt == "hf":
        act = _read_hf_config(path).get("vision_config", {}).get("hidden_act") if os.path.isdir(path) else None
        if act is not None and act != _activation(model):
            warnings.warn(f"{path} was trained with {act} but the model uses {_activation(model)}")
    converted = {k: v.to(dtype=target[k].dtype, device=target[k].device) for k, v in sd.items()}
    model.load_state_dict(converted, strict=True)
    return fmt
