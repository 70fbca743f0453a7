"""Muon: momentum SGD whose matrix updates are orthogonalised by Newton-Schulz (baseline, PR
#201/#401, R1-R7; NorMuon, PR #89, is in ``normuon.py``).

Per matrix: buf <- mu*buf + g; u = g + mu*buf (Nesterov) or buf; optionally MuonEq-R (each row of
u divided by its norm); u <- NS(u), the baseline quintic or Polar Express (``newton_schulz.py``);
then p <- p*(1 - lr*wd) - lr*s*u with s = sqrt(max(1, rows/cols)) and the *scheduled* lr, so the
decoupled decay anneals with it.

Same-shape matrices are stacked into [B, rows, cols] and orthogonalised in one batched call (what
the records' parameter banks buy) while every parameter keeps its per-layer name and its own
momentum buffer. Two layouts decide which rank computes what and how updates travel:

* ``round_robin`` (baseline, R3-R5): grads arrive DDP-averaged; parameter i is handled by rank
  i mod world, which writes s*u into one flat bf16 buffer (zeros elsewhere); an all-reduce(SUM)
  gives every rank every update.
* ``sharded`` (R1, R6/R7; ``sharded.py``): no DDP, grads arrive local. Each same-shape bank is
  reduce-scattered in bf16, each rank orthogonalises its B/world matrices and the updates are
  all-gathered, bank k's all-gather overlapping bank k+1's compute.

The layout, the NS kind, row normalisation and the momentum dtype are fixed at construction.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import Tensor

from pgolf.optim.newton_schulz import NS_COEFFS, newton_schulz5, newton_schulz_impl, row_normalize, set_newton_schulz_impl

__all__ = ["Muon", "NS_COEFFS", "MOMENTUM_DTYPES", "newton_schulz5", "set_newton_schulz_impl", "shape_factor", "shape_banks"]

MOMENTUM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = ("round_robin", "sharded")


def shape_factor(p: Tensor) -> float:
    """sqrt(max(1, rows / cols)) of an (out, in) weight."""
    return max(1.0, p.size(-2) / p.size(-1)) ** 0.5


def shape_banks(params: list[Tensor]) -> list[list[int]]:
    """Indices of ``params`` grouped by shape into banks, ordered by the bank's total numel, largest
    first (the order the sharded step launches its collectives in; for the 11-layer models that is
    mlp.fc, mlp.proj, then the d x d and the kv matrices, as R6/R7's banks), ties and members in
    first-appearance order."""
    banks: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(params):
        banks.setdefault(tuple(p.shape), []).append(i)
    return sorted(banks.values(), key=lambda idx: -len(idx) * params[idx[0]].numel())


def _dist_info() -> tuple[bool, int, int]:
    on = dist.is_available() and dist.is_initialized()
    return on, (dist.get_world_size() if on else 1), (dist.get_rank() if on else 0)


class Muon(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float,
        momentum: float,
        backend_steps: int = 5,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        *,
        ns: str = "standard",
        row_normalize: bool = False,
        momentum_dtype: torch.dtype = torch.float32,
        layout: str = "round_robin",
    ):
        assert layout in LAYOUTS and momentum_dtype in MOMENTUM_DTYPES.values(), (layout, momentum_dtype)
        newton_schulz_impl(ns)  # fails early on an unknown kind
        defaults = dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov, weight_decay=weight_decay,
                        ns=ns, row_normalize=row_normalize)
        super().__init__(params, defaults)
        self.momentum_dtype = momentum_dtype
        self.layout = layout
        self._inflight: list = []  # sharded: the launched reduce-scatters, one per bank

    def launch_grad_sync(self) -> None:
        """Sharded layout: start the async reduce-scatter of every bank's local grads, so it runs
        while the caller steps the other optimizers; ``step`` launches it itself otherwise. A no-op
        for round_robin, whose grads DDP has already averaged."""
        if self.layout == "sharded" and not self._inflight:
            from pgolf.optim.sharded import launch_reduce_scatter

            launch_reduce_scatter(self)

    @torch.no_grad()
    def step(self, closure=None):
        if self.layout == "sharded":
            from pgolf.optim.sharded import sharded_step

            sharded_step(self)
        else:
            self._round_robin_step()
        return None

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.zeros(p.shape, device=p.device, dtype=self.momentum_dtype)
        elif buf.dtype != self.momentum_dtype:  # load_state_dict casts state to the param dtype
            buf = state["momentum_buffer"] = buf.to(self.momentum_dtype)
        return buf

    def orthogonalised(self, params: list[Tensor | None], grads, group: dict) -> Tensor:
        """Momentum, Nesterov, optional row normalisation and NS for same-shape matrices in one
        batch: ``grads[j]`` is the (averaged) grad of ``params[j]``; a ``None`` param is sharding
        padding (zero grad, no state). Returns the NS output [len(params), rows, cols]."""
        mu = group["momentum"]
        directions = []
        for p, g in zip(params, grads):
            if p is None:
                directions.append(g)
                continue
            buf = self._momentum_buffer(p)
            buf.mul_(mu).add_(g)
            directions.append(g.add(buf, alpha=mu) if group["nesterov"] else buf)
        u = torch.stack(directions)
        if group["row_normalize"]:
            u = row_normalize(u)
        return newton_schulz_impl(group["ns"])(u, steps=group["backend_steps"])

    def _round_robin_step(self) -> None:
        distributed, world, rank = _dist_info()
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            lr, wd = group["lr"], group["weight_decay"]
            offsets = list(itertools.accumulate((p.numel() for p in params), initial=0))
            flat = torch.zeros(offsets[-1], device=params[0].device, dtype=torch.bfloat16)
            owned = [i for i, p in enumerate(params) if i % world == rank and p.grad is not None]
            for bank in shape_banks([params[i] for i in owned]):
                idx = [owned[j] for j in bank]
                updates = self.orthogonalised([params[i] for i in idx], [params[i].grad for i in idx], group)
                for i, u in zip(idx, updates):
                    flat[offsets[i] : offsets[i + 1]] = (u * shape_factor(params[i])).reshape(-1)
            if distributed:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for i, p in enumerate(params):
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(flat[offsets[i] : offsets[i + 1]].view_as(p).to(p.dtype), alpha=-lr)
