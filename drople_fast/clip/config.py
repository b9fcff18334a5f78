"""IWTDConfig: how IWTD is applied to a CLIP model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..ops.validation import check_probabilities
from .seeds import check_seed

MODES = ("off", "perturb", "drop", "drop_fixed")
ATTENTION_KERNELS = ("sdpa", "xformers")


@dataclass
class IWTDConfig:
    """Release defaults for ViT-B/16: vision layers 0-5, text layers 0-8, p in [0.1, 0.5].

    ``mode``: "off" (no IWTD), "perturb" (the release: selected tokens are
    scaled by 1 + sigma * eps, nothing removed), "drop" (selected tokens are
    removed by gather-compaction), "drop_fixed" (exactly ``keep`` eligible
    tokens kept per sample; a float in (0, 1] is a fraction of the eligible
    tokens, an int a count).
    """

    mode: str = "drop"
    vision_layers: Sequence[int] = field(default_factory=lambda: tuple(range(6)))
    text_layers: Sequence[int] = field(default_factory=lambda: tuple(range(9)))
    p_min: float = 0.1
    p_max: float = 0.5
    sigma: float = 0.03
    keep: Optional[float] = 0.5
    bridge_tokens: int = 64
    bridge_dim: int = 512
    seed: int = 0
    backend: Optional[str] = None
    attention: str = "sdpa"
    eos_trim: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        check_probabilities(self.p_min, self.p_max)
        self.seed = check_seed(self.seed)
        self.vision_layers = tuple(int(i) for i in self.vision_layers)
        self.text_layers = tuple(int(i) for i in self.text_layers)
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.mode == "drop_fixed":
            if self.keep is None or self.keep <= 0:
                raise ValueError(f"drop_fixed needs keep > 0 (a fraction in (0, 1] or a count), got {self.keep!r}")
            if isinstance(self.keep, float) and self.keep > 1:
                raise ValueError(f"a fractional keep must be in (0, 1], got {self.keep}")
        if self.bridge_tokens < 1 or self.bridge_dim < 1:
            raise ValueError(f"bridge size must be positive, got M={self.bridge_tokens} P={self.bridge_dim}")

    def keep_count(self, num_eligible: int) -> int:
        """The drop_fixed budget for a layer with ``num_eligible`` eligible tokens."""
        if isinstance(self.keep, float):
            return max(1, min(num_eligible, round(self.keep * num_eligible)))
        return min(num_eligible, int(self.keep))
