"""nn.Module form of the IWTD op (Liger-style: kernel -> launcher -> op -> module -> functional)."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .bridge import BridgeModule
from .functional import IWTDOutput, iwtd


class IWTD(nn.Module):
    """IWTD for one tower with its own bridge tokens and projection (width -> dim).

    ``forward(q, k, hidden, eligible, anchor_index, valid=None, seed=0)`` returns
    the :class:`~drople_fast.functional.IWTDOutput` of :func:`drople_fast.iwtd`.
    """

    def __init__(self, width: int, num_tokens: int = 64, dim: int = 512, p_min: float = 0.1, p_max: float = 0.5,
                 causal: bool = False, backend: Optional[str] = None):
        super().__init__()
        self.bridge = BridgeModule(width, width, num_tokens, dim)
        del self.bridge.text  # one tower: a single projection
        self.p_min, self.p_max, self.causal, self.backend = p_min, p_max, causal, backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, hidden: torch.Tensor, eligible: torch.Tensor,
                anchor_index: Union[int, torch.Tensor], valid: Optional[torch.Tensor] = None,
                seed: Union[int, torch.Tensor] = 0) -> IWTDOutput:
        tokens, weight, bias = self.bridge.params_for("vision")
        return iwtd(q, k, hidden, eligible, tokens, weight, bias, anchor_index, valid=valid, causal=self.causal,
                    p_min=self.p_min, p_max=self.p_max, seed=seed, backend=self.backend)

    def extra_repr(self) -> str:
        return f"p_min={self.p_min}, p_max={self.p_max}, causal={self.causal}, backend={self.backend}"
