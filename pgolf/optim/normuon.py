"""NorMuon (PR #89): Muon with a per-row second moment after Newton-Schulz.

EMA momentum m <- beta m + (1 - beta) g, Nesterov direction lerp(g, m, beta), NS5, then a
per-row second moment v (beta2, no bias correction) that divides each row by sqrt(v), the matrix
rescaled to its pre-scaling Frobenius norm, times the shape factor. Parameters are processed in
descending ``size()`` order; the owning rank (index mod world) updates a parameter and shares it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from pgolf.optim.muon import _dist_info, shape_factor
from pgolf.optim.newton_schulz import newton_schulz_impl


def normuon_row_normalise(update: Tensor, second_moment: Tensor, beta2: float) -> Tensor:
    """One NorMuon row step on an fp32 NS output: update the per-row second moment v (in place,
    EMA of the row mean of u^2, no bias correction), divide each row by sqrt(v), and rescale the
    matrix back to the Frobenius norm it had before the row scaling."""
    row_mean_sq = update.square().mean(dim=-1, keepdim=True)
    second_moment.mul_(beta2).add_(row_mean_sq, alpha=1.0 - beta2)
    norm_before = update.norm()
    scaled = update / (second_moment.sqrt() + 1e-10)
    return scaled * (norm_before / (scaled.norm() + 1e-10))


class NorMuon(torch.optim.Optimizer):
    """PR #89's optimizer for the block matrices. Parameters are processed in descending
    ``size()`` order (tuple comparison, as the original), padded per world-size block."""

    def __init__(self, params, lr: float, momentum: float, beta2: float = 0.95, backend_steps: int = 5):
        params = sorted(params, key=lambda p: tuple(p.size()), reverse=True)
        super().__init__(params, dict(lr=lr, momentum=momentum, beta2=beta2, backend_steps=backend_steps))

    @torch.no_grad()
    def step(self, closure=None):
        distributed, world, rank = _dist_info()
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            lr, beta, beta2 = group["lr"], group["momentum"], group["beta2"]
            padded = params + [params[-1]] * ((-len(params)) % world)
            for base in range(0, len(padded), world):
                idx = base + rank
                if idx < len(params):
                    p = params[idx]
                    g = p.grad if p.grad is not None else torch.zeros_like(p)
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                        state["second_moment"] = torch.zeros(g.size(0), 1, device=g.device, dtype=torch.float32)
                    m = state["momentum_buffer"]
                    m.lerp_(g, 1.0 - beta)
                    # PR #89's grad.lerp_(m, beta): the same value as (1 - beta) g + beta m in exact
                    # arithmetic, but rounded differently, which flips bf16 roundings of the NS input.
                    direction = torch.lerp(g, m, beta)
                    u = newton_schulz_impl("standard")(direction, steps=group["backend_steps"]).float()
                    u = normuon_row_normalise(u, state["second_moment"], beta2) * shape_factor(p)
                    p.add_(u.to(p.dtype), alpha=-lr)
                if distributed:
                    # Share the owners' new values. One broadcast per parameter works for
                    # unequal shapes on every backend (gloo's all_gather needs equal sizes).
                    for r in range(world):
                        if base + r < len(params):
                            dist.broadcast(params[base + r].data, src=r)
        return None
