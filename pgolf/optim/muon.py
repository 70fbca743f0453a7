"""Muon: momentum SGD whose matrix updates are orthogonalised by Newton-Schulz (baseline,
PR #201/#401; NorMuon, PR #89, is in ``normuon.py``).

The Newton-Schulz work is sharded across torchrun ranks (parameter i is handled by rank
i mod world): each rank writes its updates into one flat bf16 buffer (zeros elsewhere) and an
all-reduce(SUM) gives every rank all updates, so every rank applies identical updates. Optional
decoupled weight decay p <- p * (1 - lr * wd) uses the scheduled lr.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(grad: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise a 2-D matrix (bf16 result): X <- aX + (bA + cA^2)X, A = XX^T,
    on the wide orientation of X after normalising by its Frobenius norm."""
    a, b, c = NS_COEFFS
    x = grad.bfloat16()
    x = x / (x.norm() + eps)
    transposed = grad.size(0) > grad.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        poly = b * gram + c * gram @ gram
        x = a * x + poly @ x
    return x.T if transposed else x


# torch.compile swaps this for a compiled version on CUDA (see pgolf.train.setup).
_ns_impl = newton_schulz5


def set_newton_schulz_impl(fn) -> None:
    global _ns_impl
    _ns_impl = fn


def shape_factor(p: Tensor) -> float:
    """sqrt(max(1, rows / cols)) of an (out, in) weight."""
    return max(1.0, p.size(0) / p.size(1)) ** 0.5


def _dist_info() -> tuple[bool, int, int]:
    on = dist.is_available() and dist.is_initialized()
    return on, (dist.get_world_size() if on else 1), (dist.get_rank() if on else 0)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, backend_steps: int = 5, nesterov: bool = True, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        distributed, world, rank = _dist_info()
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            total = sum(p.numel() for p in params)
            flat = torch.zeros(total, device=params[0].device, dtype=torch.bfloat16)
            offset = 0
            for i, p in enumerate(params):
                if i % world == rank and p.grad is not None:
                    g = p.grad
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    buf = state["momentum_buffer"]
                    buf.mul_(mu).add_(g)
                    g = g.add(buf, alpha=mu) if group["nesterov"] else buf
                    update = _ns_impl(g, steps=group["backend_steps"])
                    flat[offset : offset + p.numel()] = (update * shape_factor(p)).reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                update = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(update, alpha=-lr)
                offset += p.numel()
        return None
