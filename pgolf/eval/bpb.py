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

Byte sidecar (CaseOps data, frontier.md 1.4). When the validation shards come with
``fineweb_val_bytes_*.bin``, target i (stream token i + 1) is worth ``sidecar[i + 1]`` bytes, the
original UTF-8 bytes it stands for, instead of the LUT rule (:class:`SidecarBytes`). Every
evaluation counts bytes through one function, :func:`target_bytes` (global target positions,
previous ids, target ids), which works for both; :func:`load_byte_counter` picks the sidecar when
the data has one and refuses the LUT where it would be wrong (a CaseOps tokenizer or manifest
without a sidecar).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

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

    def bytes_at(self, positions: Tensor, prev_ids: Tensor, target_ids: Tensor) -> Tensor:
        """:func:`target_bytes` interface: the LUT rule does not need the positions."""
        return self.target_bytes(prev_ids, target_ids)


@dataclass(frozen=True)
class SidecarBytes:
    """Bytes of the validation stream's tokens from its byte sidecar: ``stream_bytes[j]`` (int32
    [N + 1]) is worth of stream token j, so target i (token i + 1) is worth ``stream_bytes[i + 1]``."""

    stream_bytes: Tensor

    def to(self, device: torch.device | str) -> "SidecarBytes":
        return SidecarBytes(self.stream_bytes.to(device))

    def bytes_at(self, positions: Tensor, prev_ids: Tensor, target_ids: Tensor) -> Tensor:
        return self.stream_bytes[positions.to(self.stream_bytes.device) + 1].to(torch.int32)

    def target_bytes(self, prev_ids: Tensor, target_ids: Tensor) -> Tensor:
        raise RuntimeError(
            "byte sidecar data needs the targets' stream positions: count bytes with "
            "pgolf.eval.bpb.target_bytes(counter, positions, prev_ids, target_ids)"
        )


ByteCounter = ByteLUT | SidecarBytes


def target_bytes(counter: ByteCounter, positions: Tensor, prev_ids: Tensor, target_ids: Tensor) -> Tensor:
    """Bytes (int32) of the targets at global target indices ``positions`` (target i = stream
    token i + 1), each with the token before it: the sidecar where the data has one, else the
    LUT rule. ``positions``, ``prev_ids``, ``target_ids`` have one shape. The one byte function of
    every evaluation (standard, sliding, TTT, document scoring, phased TTT)."""
    return counter.bytes_at(positions, prev_ids, target_ids)


def load_byte_counter(sp, vocab_size: int, val_files: list[Path], val_tokens: Tensor, data_dir: str | Path | None = None) -> ByteCounter:
    """The byte counter of a validation stream ``val_tokens`` (a prefix of ``val_files``
    concatenated): :class:`SidecarBytes` when the shards have sidecars, else the LUT.

    DataError when a sidecar is missing but required (the folder's manifest records a sidecar
    transform, or the tokenizer has the CaseOps operator pieces), or does not fit the stream."""
    from pgolf.data.caseops import OPERATOR_IDS
    from pgolf.data.sidecar import stream_sidecar
    from pgolf.errors import DataError

    side = stream_sidecar([Path(f) for f in val_files])
    folder = Path(data_dir) if data_dir is not None else (Path(val_files[0]).parent if val_files else None)
    if side is None:
        transform = _manifest_transform(folder)
        if transform is not None and transform.get("byte_sidecar"):
            raise DataError(
                f"{folder / 'manifest.json'} says the data is {transform['name']} with a byte sidecar, but no "
                f"fineweb_val_bytes_*.bin is next to the validation shards; re-fetch or re-prepare {folder}"
            )
        caseops = all(i < sp.vocab_size() and sp.id_to_piece(i) == op for op, i in OPERATOR_IDS.items())
        if caseops:
            raise DataError(
                f"the tokenizer of {folder} is a CaseOps tokenizer but the validation shards have no byte sidecar "
                "(fineweb_val_bytes_*.bin): the LUT rule would charge the case operators as bytes; re-fetch or re-prepare"
            )
        return build_byte_lut(sp, vocab_size)
    n = val_tokens.numel()
    if side.size < n:
        raise DataError(f"byte sidecars of {folder} hold {side.size} entries for a {n}-token validation stream")
    stream = torch.from_numpy(side[:n].astype(np.int32))
    bos = int(sp.bos_id())
    if bos >= 0 and bool((stream[val_tokens.cpu() == bos] != 0).any()):
        raise DataError(f"byte sidecars of {folder} give BOS tokens a non-zero byte count: they are not aligned with the shards")
    return SidecarBytes(stream)


def _manifest_transform(folder: Path | None) -> dict | None:
    if folder is None or not (folder / "manifest.json").is_file():
        return None
    from pgolf.data.manifest import read_manifest

    return read_manifest(folder).get("transform")


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

    def add(self, nll: Tensor, prev_ids: Tensor, target_ids: Tensor, lut: ByteCounter, positions: Tensor | None = None) -> None:
        """nll, prev_ids, target_ids (and the targets' global positions, which a byte sidecar
        needs): same shape; every element is one scored target."""
        self.sums[0] += nll.to(torch.float64).sum()
        self.sums[1] += float(target_ids.numel())
        nbytes = lut.target_bytes(prev_ids, target_ids) if positions is None else target_bytes(lut, positions, prev_ids, target_ids)
        self.sums[2] += nbytes.to(torch.float64).sum()

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
