"""Per-head gates on the attention output (frontier.md 3.5): y_h <- g_h * y_h on the attention
output y [B, T, H, D], after XSA and before the output projection. One kind per model:

* ``attn_out`` (PR #1667): ``attn_gate_proj`` = linear window -> H, zero init;
  g = 2 sigmoid(W src[..., :window]) = 1 at init; src is the normalised block input (``proj``) or
  the raw q projection (``q``).
* ``dense`` (PR #1736, "G1" head-wise gated attention): ``attn_gate_w`` (H, d), N(0, 0.01^2);
  g = sigmoid(x W^T) from the whole normalised input, ~0.5 at init.
* ``sparse`` (R6/R7): ``attn_gate_w`` (H, window), zero init; g = sigmoid(c W x[..., :window]),
  exactly 0.5 at init (c = ``sparse_gate_scale``).

The parameters live on the attention module (``blocks.i.attn.attn_gate_w``, the records' names,
which the control-tensor routing and the int8 quant-gate rule key on); the gate itself is a plain
function chosen at build time, so ``forward`` has no branch and a deep copy (TTT) keeps it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

def attn_out_gate(attn: nn.Module, y: Tensor, x: Tensor, q_raw: Tensor) -> Tensor:
    src = q_raw if attn.gate_src == "q" else x
    g = 2.0 * torch.sigmoid(attn.attn_gate_proj(src[..., : attn.gate_window]))
    return y * g.unsqueeze(-1)


def dense_gate(attn: nn.Module, y: Tensor, x: Tensor, q_raw: Tensor) -> Tensor:
    g = torch.sigmoid(F.linear(x, attn.attn_gate_w.to(x.dtype)))
    return y * g.unsqueeze(-1)


def sparse_gate(attn: nn.Module, y: Tensor, x: Tensor, q_raw: Tensor) -> Tensor:
    g = torch.sigmoid(attn.gate_scale * F.linear(x[..., : attn.gate_window], attn.attn_gate_w.to(x.dtype)))
    return y * g.unsqueeze(-1)


GATE_FUNCTIONS = {"attn_out": attn_out_gate, "dense": dense_gate, "sparse": sparse_gate}


def add_gate_parameters(attn: nn.Module, kind: str, dim: int, num_heads: int, window: int, src: str, scale: float) -> None:
    """Register the gate's parameters on ``attn`` (initialised by ``GPT.init_weights``)."""
    from pgolf.model.layers import CastedLinear

    attn.gate_window = window
    attn.gate_src = src
    attn.gate_scale = float(scale)
    if kind == "attn_out":
        attn.attn_gate_proj = CastedLinear(window, num_heads, zero_init=True)
    elif kind == "dense":
        attn.attn_gate_w = nn.Parameter(torch.zeros(num_heads, dim, dtype=torch.float32))
    elif kind == "sparse":
        attn.attn_gate_w = nn.Parameter(torch.zeros(num_heads, window, dtype=torch.float32))
