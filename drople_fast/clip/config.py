"""IWTDConfig: how IWTD is applied to a CLIP model."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..ops.validation import check_probabilities
from .seeds import check_seed

MODES = ("off", "perturb", "drop", "drop_fixed")
ATTENTION_KERNELS = ("sdpa", "xformers")


DEFAULT_KEEP_RATIO = 0.5


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _layers(name: str, layers) -> tuple:
    try:
        items = tuple(layers)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of layer indices, got {layers!r}") from None
    for i in items:
        _int(f"{name} entry", i, 0)
    if len(set(items)) != len(items):
        raise ValueError(f"{name} has duplicate layers: {list(items)}")
    return items


@dataclass
class IWTDConfig:
    """Release defaults for ViT-B/16: vision layers 0-5, text layers 0-8, p in [0.1, 0.5].

    ``mode``: "off" (no IWTD), "perturb" (the release: selected tokens are
    scaled by 1 + sigma * eps, one eps per element, nothing removed), "drop" (selected tokens are
    removed by gather-compaction), "drop_fixed" (a fixed number of eligible
    tokens kept per sample: ``keep_ratio`` of them (a fraction in (0, 1],
    0.5 when neither is given) or ``keep_tokens`` of them (a count >= 1);
    give at most one, and only with drop_fixed).
    ``sigma``: perturb mode's noise std (the release's 0.03); 0 disables the noise, as the release's
    ``--noise_injection_sigma 0`` does, leaving every other computation of the mode in place.
    ``seed``: any 64-bit integer (see :mod:`drople_fast.clip.seeds`).
    Every field is validated here, so a bad value fails at construction,
    not at the first forward.
    """

    mode: str = "drop"
    vision_layers: Sequence[int] = field(default_factory=lambda: tuple(range(6)))
    text_layers: Sequence[int] = field(default_factory=lambda: tuple(range(9)))
    p_min: float = 0.1
    p_max: float = 0.5
    sigma: float = 0.03
    keep_ratio: Optional[float] = None
    keep_tokens: Optional[int] = None
    bridge_tokens: int = 64
    bridge_dim: int = 512
    seed: int = 0
    backend: Optional[str] = None
    attention: str = "sdpa"
    eos_trim: bool = True

    def __post_init__(self):
        from ..ops.backends import BACKENDS

        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be None (best usable) or one of {tuple(BACKENDS)}, got {self.backend!r}")
        check_probabilities(self.p_min, self.p_max)
        self.vision_layers = _layers("vision_layers", self.vision_layers)
        self.text_layers = _layers("text_layers", self.text_layers)
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) or not 0 <= self.sigma < math.inf:
            raise ValueError(f"sigma must be a finite number >= 0, got {self.sigma!r}")
        self.seed = check_seed(self.seed)
        _int("bridge_tokens", self.bridge_tokens, 1)
        _int("bridge_dim", self.bridge_dim, 1)
        if not isinstance(self.eos_trim, bool):
            raise ValueError(f"eos_trim must be True or False, got {self.eos_trim!r}")
        self._check_keep()

    def _check_keep(self) -> None:
        ratio, tokens = self.keep_ratio, self.keep_tokens
        if ratio is not None and tokens is not None:
            raise ValueError(f"give keep_ratio or keep_tokens, not both (got keep_ratio={ratio!r}, "
                             f"keep_tokens={tokens!r})")
        if (ratio is not None or tokens is not None) and self.mode != "drop_fixed":
            given = f"keep_ratio={ratio!r}" if ratio is not None else f"keep_tokens={tokens!r}"
            raise ValueError(f"{given} only applies to mode='drop_fixed', not mode={self.mode!r}")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not 0 < ratio <= 1):
            raise ValueError(f"keep_ratio must be a fraction in (0, 1], got {ratio!r} (use keep_tokens for a count)")
        if tokens is not None:
            _int("keep_tokens", tokens, 1)

    def keep_count(self, num_eligible: int) -> int:
        """The drop_fixed budget for a layer with ``num_eligible`` eligible tokens."""
        if self.keep_tokens is not None:
            return min(num_eligible, self.keep_tokens)
        ratio = DEFAULT_KEEP_RATIO if self.keep_ratio is None else float(self.keep_ratio)
        return max(1, min(num_eligible, round(ratio * num_eligible)))
