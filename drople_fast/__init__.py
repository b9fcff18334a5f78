"""drople_fast: fast DroPLe (Dropout Prompt Learning) for open_clip CLIP models.

Three layers, one package each: :mod:`drople_fast.ops` (the IWTD operator),
:mod:`drople_fast.clip` (the open_clip patch) and :mod:`drople_fast.training`
(the DroPLe method, loaded lazily on first use of ``DroPLe``, ``TrainConfig``
or ``train``).
"""
from .clip import (IWTDConfig, PromptHook, apply, bridge_features, is_patched, load_patch_state_dict, patch_state_dict,
                   remove, set_prompt_hook)
from .ops import Compacted, IWTDOutput, compact, compact_fixed, iwtd

__version__ = "0.1.0"

# Load the C++ operator now, not on the first call (which may be inside a torch.compile trace).
from .ops import library as _library  # noqa: E402

_library.cpp_extension_error()

_TRAINING_NAMES = ("DroPLe", "TrainConfig", "train")


def __getattr__(name: str):
    # The training stack (torchvision, PIL, tqdm) is imported on first use only.
    if name in _TRAINING_NAMES:
        from . import training as _training

        return getattr(_training, name)
    raise AttributeError(f"module 'drople_fast' has no attribute {name!r}")


__all__ = [
    "IWTDConfig", "IWTDOutput", "Compacted", "iwtd", "compact", "compact_fixed",
    "apply", "remove", "is_patched", "set_prompt_hook", "bridge_features", "patch_state_dict",
    "load_patch_state_dict", "PromptHook", "DroPLe", "TrainConfig", "train", "__version__",
]
