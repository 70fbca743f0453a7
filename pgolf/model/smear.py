"""SmearGate (PR #162 lineage, used by PR #201/#401): each position mixes in a learned, per-channel
fraction of the previous position's embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

class SmearGate(nn.Module):
    """out_t = (1 - g) * x_t + g * x_{t-1}, g = sigmoid(gate) per channel, x_{-1} = 0.

    The gate starts at zero (g = 0.5). In document-aware mode the gate is zero at BOS positions,
    so a document's BOS never absorbs the previous document's last token.
    """

    def __init__(self, dim: int, bos_id: int | None):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim, dtype=torch.float32))
        self.bos_id = bos_id

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate).to(x.dtype)[None, None, :]
        if self.bos_id is not None:
            g = g * (ids != self.bos_id).unsqueeze(-1).to(x.dtype)
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        return (1 - g) * x + g * prev
