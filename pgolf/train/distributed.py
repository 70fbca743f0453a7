"""Process-group setup: torchrun when launched that way (NCCL on CUDA, gloo on CPU), otherwise a
single process. Also seeding and the small collective helpers every rank must agree on."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from pgolf.errors import ConfigError

            raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def process_group_backend(device: torch.device) -> str:
    """The torch.distributed backend a torchrun launch uses on ``device``: NCCL on CUDA, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(requested_device: str = "auto", timeout_seconds: float = 600.0) -> DistContext:
    """Join the torchrun process group if RANK/WORLD_SIZE are set; otherwise run alone.

    ``timeout_seconds`` bounds how long a collective waits for a rank that died or hangs: the
    survivors then fail with an error instead of waiting forever (torchrun also stops the other
    workers as soon as one exits with an error)."""
    from datetime import timedelta

    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed and not dist.is_initialized():
        if process_group_backend(device) == "nccl":
            dist.init_process_group(backend="nccl", device_id=device, timeout=timedelta(seconds=timeout_seconds))
        else:
            dist.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout_seconds))
        dist.barrier()
    return DistContext(rank, world, local_rank, device, distributed)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical init everywhere (and DDP broadcasts rank 0's anyway)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def all_reduce_max_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any rank (stop decisions must agree, or ranks hang)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor(int(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
