"""Validation stream and the standard (non-overlapping) evaluation.

The validation stream is every validation shard concatenated and cut to
``((N - 1) // L) * L + 1`` tokens, so it holds a whole number of L-token windows plus the one
token that the last window's final target needs. The standard eval cuts it into consecutive
windows of L; every target is scored once, with the context of its own window. Windows are split
contiguously across ranks and the float64 sums all-reduced. Bytes come from
``pgolf.eval.bpb.target_bytes`` (the LUT rule, or the byte sidecar of CaseOps data).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from pgolf.data.shards import load_tokens
from pgolf.errors import DataError
from pgolf.eval.bpb import BPBAccumulator, ByteCounter, EvalResult

# (ids [B, T], targets [B, T], first_scored) -> per-token NLL [B, T - first_scored]
NLLFn = Callable[[Tensor, Tensor, int], Tensor]


def load_validation_tokens(files: list[Path], seq_len: int, max_tokens: int = 0) -> Tensor:
    """The validation stream as int64, cut to a whole number of ``seq_len`` windows (+1 token).

    ``max_tokens`` > 0 keeps only a prefix (for smoke tests; a reported score never uses it).
    """
    tokens = load_tokens(files)
    if max_tokens > 0:
        tokens = tokens[: max_tokens + 1]
    usable = ((tokens.size - 1) // seq_len) * seq_len
    if usable <= 0:
        raise DataError(
            f"validation split {files[0].parent / files[0].name if len(files) == 1 else files[0].parent} has "
            f"{tokens.size} tokens, too short for sequence length {seq_len}; use a shorter eval/train seq len "
            "or prepare more validation documents (--val-docs)"
        )
    return torch.from_numpy(tokens[: usable + 1].astype(np.int64))


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate_standard(
    nll_fn: NLLFn,
    val_tokens: Tensor,
    seq_len: int,
    lut: ByteCounter,
    *,
    batch_tokens: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> EvalResult:
    """Score every target of ``val_tokens`` once, in consecutive ``seq_len`` windows."""
    t0 = time.perf_counter()
    total_seqs = (val_tokens.numel() - 1) // seq_len
    seq_start = total_seqs * rank // world_size
    seq_end = total_seqs * (rank + 1) // world_size
    seqs_per_batch = max(1, batch_tokens // (world_size * seq_len))
    lut = lut.to(device)
    acc = BPBAccumulator(device)
    starts = range(seq_start, seq_end, seqs_per_batch)
    bar = _progress(starts, "eval", progress and rank == 0)
    for s in bar:
        e = min(s + seqs_per_batch, seq_end)
        chunk = val_tokens[s * seq_len : e * seq_len + 1].to(device)
        x = chunk[:-1].view(-1, seq_len)
        y = chunk[1:].view(-1, seq_len)
        positions = torch.arange(s * seq_len, e * seq_len, device=device).view(-1, seq_len)  # target indices
        with autocast_context(device, autocast_dtype):
            nll = nll_fn(x, y, 0)
        acc.add(nll.float(), x, y, lut, positions)
    return acc.result().with_seconds(time.perf_counter() - t0)


def _progress(iterable, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=None)
