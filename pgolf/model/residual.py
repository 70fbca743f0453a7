"""How blocks and skips combine on the residual stream, each rule a plain function chosen at build
time (so ``forward`` has no switches and a deep copy keeps the choice).

* ``sequential_residual`` (baseline): x_in = mix(x, x0); x = x_in + a(x_in); x = x + f(x).
* ``parallel_residual`` (GPT-J form, R5; frontier.md 3.2): both branches read x_in:
  x = x_in + a(x_in) + f(x_in). Per physical layer, so it also holds inside loops.
* ``two_lane_step`` (R6/R7): an attention lane and an MLP lane, mixed by the learned lambdas
  P (L, 2, 2) and R (L, 2) on the GPT root; the attention reads mix(lane0, x0), the MLP reads lane1.
* ``additive_skip`` (baseline U-Net skip): x + w_j s; ``gated_skip`` (R3+, frontier.md 3.3):
  lerp(w_j s, x, sigmoid(g_j)), an even 0.5/0.5 mix at init.

Here a(.) = attn_scale * Attn(norm(.)) and f(.) = mlp_scale * MLP(norm(.)) (``Block`` methods).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _row(v: Tensor, dtype: torch.dtype) -> Tensor:
    return v.to(dtype)[None, None, :]


def sequential_residual(block: nn.Module, x: Tensor, x0: Tensor, value_embed: Tensor | None) -> Tensor:
    x = block.mix_input(x, x0)
    x = x + block.attn_branch(x, value_embed)
    return x + block.mlp_branch(x)


def parallel_residual(block: nn.Module, x: Tensor, x0: Tensor, value_embed: Tensor | None) -> Tensor:
    x = block.mix_input(x, x0)
    return x + block.attn_branch(x, value_embed) + block.mlp_branch(x)


def additive_skip(model: nn.Module, j: int, x: Tensor, skip: Tensor) -> Tensor:
    return x + _row(model.skip_weights[j], x.dtype) * skip


def gated_skip(model: nn.Module, j: int, x: Tensor, skip: Tensor) -> Tensor:
    gate = torch.sigmoid(_row(model.skip_gates[j], x.dtype))
    return torch.lerp(_row(model.skip_weights[j], x.dtype) * skip, x, gate)


def two_lane_step(model: nn.Module, i: int, lane0: Tensor, lane1: Tensor, x0: Tensor, value_embed: Tensor | None) -> tuple[Tensor, Tensor]:
    """Block ``i`` in the two-lane decoder: returns the new (lane0, lane1)."""
    block = model.blocks[i]
    a = block.attn_branch(block.mix_input(lane0, x0), value_embed)
    f = block.mlp_branch(lane1)
    post = model.parallel_post_lambdas[i].to(a.dtype)  # [2 (attn, mlp), 2 (lane0, lane1)]
    resid = model.parallel_resid_lambdas[i].to(a.dtype)
    new0 = resid[0] * lane0 + post[0, 0] * a + post[1, 0] * f
    new1 = resid[1] * lane1 + post[0, 1] * a + post[1, 1] * f
    return new0, new1


FINAL_LANE = {
    "mean": lambda lane0, lane1: 0.5 * (lane0 + lane1),
    "attn": lambda lane0, lane1: lane0,
    "mlp": lambda lane0, lane1: lane1,
}
