"""MLP variants of the experiment switch ``model.mlp_kind`` (issue 16; off in every preset).

* ``swiglu``: proj(silu(gate(x)) * fc(x)) at hidden h' = ``ModelConfig.swiglu_hidden`` = 2/3 of
  the relu^2 hidden, rounded to the nearest multiple of 32, so its three matrices hold the
  parameters of the relu^2 MLP's two (3 d h' = 2 d h up to the rounding).
* ``star_relu`` (MetaFormer's StarReLU): proj(s * relu(fc(x))^2 + b) with a learned scalar scale
  ``s`` (``mlp.star_scale``, init 1) and bias ``b`` (``mlp.star_bias``, init 0): at init exactly
  the relu^2 MLP.

``proj`` starts at zero in both (``zero_init``), as in the relu^2 MLP, so every block starts as
the identity on the residual stream. ``fc``/``gate`` take the model's ``linear_init``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.layers import CastedLinear


class SwiGLUMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = CastedLinear(dim, hidden)
        self.fc = CastedLinear(dim, hidden)
        self.proj = CastedLinear(hidden, dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.silu(self.gate(x)) * self.fc(x))


class StarReLUMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc = CastedLinear(dim, hidden)
        self.proj = CastedLinear(hidden, dim, zero_init=True)
        self.star_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))
        self.star_bias = nn.Parameter(torch.zeros(1, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc(x)).square()
        return self.proj(self.star_scale.to(h.dtype) * h + self.star_bias.to(h.dtype))


def build_mlp_variant(kind: str, dim: int, relu2_hidden: int, swiglu_hidden: int) -> nn.Module:
    if kind == "swiglu":
        return SwiGLUMLP(dim, swiglu_hidden)
    return StarReLUMLP(dim, relu2_hidden)
