"""The multimodal alignment ("bridge") module of docs/design.md §5, shared by both towers."""
from __future__ import annotations

import math

import torch
from torch import nn


class BridgeModule(nn.Module):
    """M learnable bridge tokens (M x P) and one linear map per tower (D_tower -> P).

    Initialised as the release's MultimodalAlignmentGuidance: the tokens by
    ``kaiming_uniform_(a=sqrt(5))``, i.e. U(±1/sqrt(P)) (release/utils/multimodal_alignment.py:16-17),
    the maps by ``nn.Linear``'s own default (release/utils/multimodal_alignment.py:20-21).
    """

    def __init__(self, vision_width: int, text_width: int, num_tokens: int = 64, dim: int = 512):
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(num_tokens, dim))
        nn.init.kaiming_uniform_(self.tokens, a=math.sqrt(5))
        self.vision = nn.Linear(vision_width, dim)
        self.text = nn.Linear(text_width, dim)

    def params_for(self, tower: str):
        """(bridge_tokens, bridge_weight, bridge_bias) as the ``iwtd`` op takes them."""
        proj = self.vision if tower == "vision" else self.text
        return self.tokens, proj.weight, proj.bias
