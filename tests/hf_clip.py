"""Writing Hugging Face CLIP folders from open_clip models: the inverse of
drople_fast.training.pretrained's HF reader, needed only to make test archives."""
from __future__ import annotations

import json
import os
import re
from typing import Dict

import torch

from drople_fast.training.pretrained import _BLOCK_RENAMES, _PLAIN_RENAMES, _TOWERS, _TRANSPOSED, _activation


def open_clip_to_hf(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """open_clip ``CLIP`` state dict -> HF ``CLIPModel`` names.

    Fused ``in_proj`` q/k/v weights are split into three projections; the
    (width, embed) projections are transposed into Linear (embed, width)
    weights. Keys with no HF counterpart raise ValueError.
    """
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in _PLAIN_RENAMES:
            out[_PLAIN_RENAMES[key]] = value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t()
            continue
        for block_prefix, hf_prefix in _TOWERS:
            m = re.fullmatch(re.escape(block_prefix) + r"(\d+)\.(.+)", key)
            if not m:
                continue
            layer, suffix = m.groups()
            base = f"{hf_prefix}encoder.layers.{layer}."
            if suffix in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if suffix.endswith("weight") else "bias"
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}_proj.{kind}"] = part
            elif suffix in _BLOCK_RENAMES:
                out[base + _BLOCK_RENAMES[suffix]] = value
            else:
                raise ValueError(f"open_clip key {key!r} has no Hugging Face CLIP counterpart")
            break
        else:
            raise ValueError(f"open_clip key {key!r} has no Hugging Face CLIP counterpart")
    return out


def save_hf_clip(model: torch.nn.Module, folder: str) -> None:
    """Write ``model`` as a Hugging Face CLIP folder: ``model.safetensors``
    (names as in transformers' ``CLIPModel``) and a minimal ``config.json``."""
    from safetensors.torch import save_file

    sd = model.state_dict()
    hf = {k: v.detach().cpu().contiguous().clone() for k, v in open_clip_to_hf(sd).items()}
    vis_layers = len(model.visual.transformer.resblocks)
    txt_layers = len(model.transformer.resblocks)
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    act = _activation(model)
    config = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": int(sd["text_projection"].shape[1]),
        "logit_scale_init_value": float(sd["logit_scale"].reshape(()).item()),
        "vision_config": {
            "hidden_size": int(sd["visual.conv1.weight"].shape[0]),
            "intermediate_size": int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "num_attention_heads": int(model.visual.transformer.resblocks[0].attn.num_heads),
            "num_hidden_layers": vis_layers,
            "image_size": int(patch * grid),
            "patch_size": int(patch),
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
        },
        "text_config": {
            "hidden_size": int(sd["ln_final.weight"].shape[0]),
            "intermediate_size": int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "num_attention_heads": int(model.transformer.resblocks[0].attn.num_heads),
            "num_hidden_layers": txt_layers,
            "max_position_embeddings": int(sd["positional_embedding"].shape[0]),
            "vocab_size": int(sd["token_embedding.weight"].shape[0]),
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
        },
    }
    os.makedirs(folder, exist_ok=True)
    save_file(hf, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
