"""The sharded ("parallel") Muon step of R1 and R6/R7, and the grouped all-reduce of the other
(replicated) parameters' grads that replaces DDP alongside it.

Without DDP every rank holds its local grads. Per same-shape bank (largest numel first), B is padded
to a multiple of world and the grads are copied into a zeroed [B_pad, rows, cols] bf16 buffer; an
async reduce-scatter(SUM) gives rank r whole matrices r*k .. r*k+k-1 (k = B_pad / world), divided by
world (gloo has no AVG; for a power-of-two world the division is exact). Rank r runs momentum /
Nesterov / row normalisation / NS on its k matrices only (padding slots are zeros and are
discarded), then an async all_gather_into_tensor collects every rank's updates. Bank k's all-gather
is awaited and applied after bank k+1's compute has been issued, so communication and NS overlap.
Momentum state lives only on the rank that owns a matrix.

With no process group the same code runs with world 1 and no collectives, which makes a
one-process run the reference for a sharded one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from pgolf.optim.muon import Muon, _dist_info, shape_banks, shape_factor

# torch 2.13 renamed reduce_scatter_tensor / all_gather_into_tensor (the old names warn); older
# releases, like the records' 2.11, only have the old ones. Same arguments either way.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

SMALL_NUMEL = 1 << 15  # replicated grads up to this size share one flat all-reduce


def launch_reduce_scatter(opt: Muon) -> None:
    """Queue one (group, params, shard, work) per bank on ``opt._inflight``: the grads copied into
    a padded bf16 buffer and an async reduce-scatter of it into this rank's shard."""
    distributed, world, _ = _dist_info()
    for group in opt.param_groups:
        params = group["params"]
        for bank in shape_banks(params):
            members = [params[i] for i in bank]
            first = members[0]
            padded = len(members) + (-len(members)) % world
            full = torch.zeros(padded, *first.shape, device=first.device, dtype=torch.bfloat16)
            for j, p in enumerate(members):
                if p.grad is not None:
                    full[j].copy_(p.grad)
            work = None
            shard = full
            if distributed:
                shard = torch.empty(padded // world, *first.shape, device=first.device, dtype=torch.bfloat16)
                work = _reduce_scatter(shard, full, op=dist.ReduceOp.SUM, async_op=True)
            opt._inflight.append((group, members, shard, work))


def _apply(group: dict, members: list[Tensor], updates: Tensor, work) -> None:
    """p <- p*(1 - lr*wd), then p <- p - lr*s*u, for a bank whose all-gather is ``work``."""
    if work is not None:
        work.wait()
    lr, wd = group["lr"], group["weight_decay"]
    if wd:
        torch._foreach_mul_(members, 1.0 - lr * wd)
    ups = [u.to(p.dtype) for p, u in zip(members, updates.unbind(0))]  # drops the padding slots
    torch._foreach_add_(members, ups, alpha=-lr * shape_factor(members[0]))


def sharded_step(opt: Muon) -> None:
    if not opt._inflight:
        launch_reduce_scatter(opt)
    distributed, world, rank = _dist_info()
    pending = None
    for group, members, shard, work in opt._inflight:
        if work is not None:
            work.wait()
            shard.div_(world)
        k = shard.size(0)
        owned = [members[i] if i < len(members) else None for i in range(rank * k, rank * k + k)]
        local = opt.orthogonalised(owned, shard.unbind(0), group).contiguous()
        gathered, gather = local, None
        if distributed:
            gathered = torch.empty(k * world, *local.shape[1:], device=local.device, dtype=local.dtype)
            gather = _all_gather(gathered, local, async_op=True)
        if pending is not None:
            _apply(*pending)
        pending = (group, members, gathered, gather)
    opt._inflight = []
    if pending is not None:
        _apply(*pending)


def all_reduce_replicated_grads(params, small_numel: int = SMALL_NUMEL) -> None:
    """Average the grads of the parameters Muon does not shard (embeddings, scalars) over ranks,
    as DDP would: each grad with numel > small_numel gets its own async all-reduce; the smaller
    ones are concatenated per (device, dtype) into one flat buffer and all-reduced in ONE call
    (dozens of tiny collectives cost more latency than their bytes). Sums, then divides by world.
    Params without a grad are skipped (every rank must have the same ones). No-op without a
    process group."""
    distributed, world, _ = _dist_info()
    if not distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    large = [g for g in grads if g.numel() > small_numel]
    works = [dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True) for g in large]
    packs: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        if g.numel() <= small_numel:
            packs.setdefault((g.device, g.dtype), []).append(g)
    for pack in packs.values():
        flat = torch.cat([g.reshape(-1) for g in pack])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        for g, chunk in zip(pack, flat.split([g.numel() for g in pack])):
            g.copy_(chunk.view_as(g))
    for g, work in zip(large, works):
        work.wait()
        g.div_(world)
