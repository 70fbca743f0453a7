"""SmearGate v1 (PR #162 lineage, used by PR #201/#401): each position mixes in a learned, per-channel
fraction of the previous position's embedding; and the input-dependent v2 of the frontier records."""

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


def smear_v2(model: nn.Module, x: Tensor, ids: Tensor) -> Tensor:
    """SmearGate v2 (PR #1667 via #1797; R7) on the raw token embedding e [B, T, d]:
    e_t <- e_t + lambda * sigmoid(w . e_t[:window]) * e_{t-1} for t >= 1, times 1[ids_t != BOS]
    when ``model.smear_bos_id`` is set (R7's fix: without it a packed document's BOS absorbs the
    previous document's last token). Identity at init (lambda = 0). Parameters on the GPT root:
    ``smear_gate`` (linear window -> 1) and ``smear_lambda`` (1,)."""
    window = model.cfg.gate_window
    gate = torch.sigmoid(model.smear_gate(x[:, 1:, :window]))  # [B, T-1, 1]
    if model.smear_bos_id is not None:
        gate = gate * (ids[:, 1:] != model.smear_bos_id).unsqueeze(-1).to(gate.dtype)
    smeared = x[:, 1:] + model.smear_lambda.to(x.dtype) * gate * x[:, :-1]
    return torch.cat((x[:, :1], smeared), dim=1)
