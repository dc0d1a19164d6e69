"""Group LayerNorm (MTGR): one LayerNorm's scale and shift per token group (user/action/item/context).

Tokens of different kinds live in different semantic spaces; sharing one affine transform forces them
onto one scale. The statistics are per token (as LayerNorm); only the affine parameters are per group,
gathered by each token's type, so it is one vectorised op instead of a loop over groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GLNConfig:
    num_groups: int = 4  # contracts.tokenizer TOKEN_GROUP_* (user, action, item, context)
    grouped: bool = True  # False: one shared LayerNorm (the ablation switch)
    eps: float = 1e-6


class GroupLayerNorm(nn.Module):
    def __init__(self, d_model: int, config: GLNConfig | None = None):
        super().__init__()
        self.config = c = config or GLNConfig()
        groups = c.num_groups if c.grouped else 1
        self.d_model = d_model
        self.weight = nn.Parameter(torch.ones(groups, d_model))
        self.bias = nn.Parameter(torch.zeros(groups, d_model))

    def forward(self, x: torch.Tensor, token_types: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D); token_types: (B, L) ints in [0, num_groups)."""
        normed = F.layer_norm(x, (self.d_model,), eps=self.config.eps)
        types = token_types if self.config.grouped else torch.zeros_like(token_types)
        return normed * self.weight[types] + self.bias[types]
