"""Shared value embedding (PR #374/#401, "VE128"): one token table whose projection is added to
the value projection of chosen blocks, each with its own learned scale."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pgolf.model.layers import CastedLinear

class SharedValueEmbedding(nn.Module):
    """One table (vocab x ve_dim) projected to kv_dim and scaled, computed once per forward and
    added to the value projection of the chosen blocks, each with its own learned scale."""

    def __init__(self, vocab_size: int, ve_dim: int, kv_dim: int, scale_init: float):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, ve_dim)
        self.proj = CastedLinear(ve_dim, kv_dim)
        self.scale = nn.Parameter(torch.tensor(scale_init, dtype=torch.float32))

    def forward(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        return self.scale.to(dtype) * self.proj(self.embed(ids).to(dtype))
