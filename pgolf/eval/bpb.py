"""The official byte rule and exact val_loss / val_bpb accumulation.

Byte lookup tables over max(tokenizer vocab, model vocab) ids:

* control, unknown and unused pieces (pad, bos, eos, unk, and ids past the tokenizer's vocab):
  0 bytes and ``boundary = True``;
* byte-fallback pieces ``<0xNN>``: 1 byte;
* normal pieces: a leading U+2581 ("▁") sets ``has_leading_space`` and is stripped; the base is
  the UTF-8 length of the rest.

A scored target y with previous token x (the input at the same position) is worth
``base_bytes[y] + (has_leading_space[y] and not boundary[x])`` bytes: the space is counted unless
the previous token is BOS or another control token. BOS targets are worth 0 bytes but their NLL
still counts. val_loss = sum(NLL) / targets; val_bpb = sum(NLL) / (ln 2 * sum(bytes)). Every sum
is float64 and all-reduced across ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class ByteLUT:
    base_bytes: Tensor  # int16 [V]
    has_leading_space: Tensor  # bool [V]
    is_boundary: Tensor  # bool [V]

    def to(self, device: torch.device | str) -> "ByteLUT":
        return ByteLUT(self.base_bytes.to(device), self.has_leading_space.to(device), self.is_boundary.to(device))

    def target_bytes(self, prev_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Bytes of each target given the token before it (same shapes; int32 result)."""
        extra = self.has_leading_space[target_ids] & ~self.is_boundary[prev_ids]
        return self.base_bytes[target_ids].to(torch.int32) + extra.to(torch.int32)


def build_byte_lut(sp, vocab_size: int) -> ByteLUT:
    """Tables for a ``sentencepiece.SentencePieceProcessor`` and the model's vocab size."""
    sp_vocab = int(sp.vocab_size())
    size = max(sp_vocab, vocab_size)
    base = np.zeros(size, dtype=np.int16)
    space = np.zeros(size, dtype=np.bool_)
    boundary = np.ones(size, dtype=np.bool_)
    for i in range(sp_vocab):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteLUT(torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary))


class BPBAccumulator:
    """Float64 sums of NLL, scored targets and their bytes; ``result`` all-reduces them."""

    def __init__(self, device: torch.device | str):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, targets, bytes

    def add(self, nll: Tensor, prev_ids: Tensor, target_ids: Tensor, lut: ByteLUT) -> None:
        """nll, prev_ids, target_ids: same shape; every element is one scored target."""
        self.sums[0] += nll.to(torch.float64).sum()
        self.sums[1] += float(target_ids.numel())
        self.sums[2] += lut.target_bytes(prev_ids, target_ids).to(torch.float64).sum()

    def add_sums(self, nll_sum: float, targets: int, nbytes: float) -> None:
        self.sums += torch.tensor([nll_sum, targets, nbytes], dtype=torch.float64, device=self.sums.device)

    def result(self) -> "EvalResult":
        sums = self.sums.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        nll, targets, nbytes = (float(v) for v in sums.cpu())
        return EvalResult.from_sums(nll, int(round(targets)), nbytes)


@dataclass(frozen=True)
class EvalResult:
    val_loss: float
    val_bpb: float
    targets: int
    bytes: int
    nll_sum: float
    seconds: float = 0.0

    @staticmethod
    def from_sums(nll_sum: float, targets: int, nbytes: float, seconds: float = 0.0) -> "EvalResult":
        if targets <= 0 or nbytes <= 0:
            raise ValueError("no scored targets (or zero bytes): the validation split is empty")
        return EvalResult(
            val_loss=nll_sum / targets,
            val_bpb=nll_sum / (math.log(2.0) * nbytes),
            targets=targets,
            bytes=int(round(nbytes)),
            nll_sum=nll_sum,
            seconds=seconds,
        )

    def with_seconds(self, seconds: float) -> "EvalResult":
        return EvalResult(self.val_loss, self.val_bpb, self.targets, self.bytes, self.nll_sum, seconds)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "val_loss": self.val_loss,
            "val_bpb": self.val_bpb,
            "targets": self.targets,
            "bytes": self.bytes,
            "eval_seconds": self.seconds,
        }
