"""Per-token byte sidecars of validation shards (CaseOps data, frontier.md 1.4).

``fineweb_val_bytes_NNNNNN.bin`` sits next to ``fineweb_val_NNNNNN.bin``, in the same format (the
shard header, then one uint16 per token) and aligned 1:1 with it: entry i is the number of
original UTF-8 bytes that token i stands for (BOS 0, operators 0). val_bpb then divides by the
sidecar's bytes of the scored targets instead of the LUT rule (``pgolf.eval.bpb.SidecarBytes``).

The challenge's shard glob ``fineweb_val_*.bin`` also matches the sidecars, so every shard listing
in pgolf drops names containing ``_bytes_`` (:func:`is_sidecar`), and a sidecar whose header or
length does not match its shard is a one-line error naming both files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pgolf.data.shards import HEADER_BYTES, shard_token_count, write_shard
from pgolf.errors import DataError

SIDECAR_TAG = "_bytes_"


def is_sidecar(path: str | Path) -> bool:
    """Whether a file name is a byte sidecar (never a token shard)."""
    return SIDECAR_TAG in Path(path).name


def sidecar_path(shard: str | Path) -> Path:
    """``.../fineweb_val_000003.bin`` -> ``.../fineweb_val_bytes_000003.bin``."""
    shard = Path(shard)
    stem, _, index = shard.stem.rpartition("_")
    if not stem or not index.isdigit() or is_sidecar(shard):
        raise DataError(f"{shard}: not a token shard name of the form <prefix>_NNNNNN.bin, so it has no sidecar name")
    return shard.with_name(f"{stem}{SIDECAR_TAG}{index}{shard.suffix}")


def write_sidecar(shard: str | Path, counts: np.ndarray) -> Path:
    """Write the sidecar of ``shard`` (atomically); ``counts`` must have one entry per token of it."""
    path = sidecar_path(shard)
    n = shard_token_count(shard)
    if np.asarray(counts).size != n:
        raise DataError(f"{path}: {np.asarray(counts).size} byte counts for {shard} with {n} tokens")
    write_shard(path, np.asarray(counts))
    return path


def read_sidecar(shard: str | Path) -> np.ndarray:
    """The byte counts of ``shard`` (uint16, one per token), checked against the shard."""
    shard, path = Path(shard), sidecar_path(shard)
    if not path.is_file():
        raise DataError(f"{path}: missing byte sidecar of {shard}; re-fetch or re-prepare the validation split")
    try:
        count = shard_token_count(path)
    except DataError as exc:
        reason = str(exc).removeprefix(f"{path}: ").split(";")[0]
        raise DataError(f"{path}: byte sidecar of {shard} is damaged ({reason}); re-fetch or re-prepare it") from None
    tokens = shard_token_count(shard)
    if count != tokens:
        raise DataError(
            f"{path} has {count} byte counts but its shard {shard} has {tokens} tokens; "
            "they must be aligned 1:1: re-fetch or re-prepare both"
        )
    return np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES).astype(np.uint16, copy=False)


def stream_sidecar(val_files: list[Path]) -> np.ndarray | None:
    """The sidecar of the concatenated validation stream (uint16), or None when no shard has one.

    Some shards with a sidecar and some without is an error naming the first missing one: the
    metric never mixes the sidecar with the LUT rule."""
    present = [sidecar_path(f).is_file() for f in val_files]
    if not any(present):
        return None
    if not all(present):
        missing = val_files[present.index(False)]
        raise DataError(f"{sidecar_path(missing)}: missing byte sidecar of {missing} (other validation shards have one); re-fetch or re-prepare")
    return np.concatenate([read_sidecar(f) for f in val_files])
