"""The open_clip integration: the in-place patch, token bookkeeping, attention and the bridge module."""
from .config import IWTDConfig
from .patch import (PromptHook, apply, bridge_features, is_patched, load_patch_state_dict, patch_state_dict, remove,
                    set_prompt_hook, text_tower)

__all__ = ["IWTDConfig", "PromptHook", "apply", "bridge_features", "is_patched", "load_patch_state_dict",
           "patch_state_dict", "remove", "set_prompt_hook", "text_tower"]
