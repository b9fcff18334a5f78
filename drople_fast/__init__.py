"""drople_fast: fast DroPLe (Dropout Prompt Learning) for open_clip CLIP models."""
from .config import IWTDConfig
from .functional import Compacted, IWTDOutput, compact, compact_fixed, iwtd
from .modules import IWTD
from .learner import DroPLe
from .patch import (PromptHook, apply, bridge_features, is_patched, load_patch_state_dict, patch_state_dict, remove,
                    set_prompt_hook)
from .trainer import TrainConfig, train

__version__ = "0.1.0"

# Load the C++ operator now, not on the first call (which may be inside a torch.compile trace).
from . import ops as _ops  # noqa: E402

_ops.cpp_extension_error()

__all__ = [
    "IWTDConfig", "IWTD", "IWTDOutput", "Compacted", "iwtd", "compact", "compact_fixed",
    "apply", "remove", "is_patched", "set_prompt_hook", "bridge_features", "patch_state_dict",
    "load_patch_state_dict", "PromptHook", "DroPLe", "TrainConfig", "train", "__version__",
]
