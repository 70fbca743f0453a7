"""The challenge's token shard format.

A shard is a header of 256 little-endian int32 (word 0: magic 20240520, word 1: version 1,
word 2: token count) followed by the tokens as little-endian uint16. The file size must be exactly
1024 + 2 * count. Documents are stored as BOS + tokens (no EOS), concatenated.
"""

from __future__ import annotations

import glob as globlib
import os
from pathlib import Path

import numpy as np

from pgolf.errors import DataError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write ``tokens`` (values < 65536) as a shard, atomically (temp file + rename)."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > 0xFFFF):
        raise DataError(f"{path}: token ids must fit in uint16 (got range {tokens.min()}..{tokens.max()})")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_token_count(path: str | Path) -> int:
    """Validate the header and size of a shard and return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as exc:
        raise DataError(f"{path}: cannot read shard ({exc.strerror})") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: truncated shard header ({len(raw)} of {HEADER_BYTES} bytes); re-download or re-run `pgolf data prepare`")
    header = np.frombuffer(raw, dtype="<i4")
    if int(header[0]) != SHARD_MAGIC:
        raise DataError(f"{path}: not a token shard (magic {int(header[0])}, expected {SHARD_MAGIC}); check the data path")
    if int(header[1]) != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {int(header[1])} (expected {SHARD_VERSION})")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise DataError(
            f"{path}: shard {what}: header says {count} tokens ({expected} bytes) but the file has {size} bytes; "
            "re-download or re-run `pgolf data prepare`"
        )
    return count


def read_shard(path: str | Path) -> np.ndarray:
    """All tokens of a validated shard as a uint16 array."""
    count = shard_token_count(path)
    tokens = np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES)
    if tokens.size != count:
        raise DataError(f"{path}: short read ({tokens.size} of {count} tokens)")
    return tokens.astype(np.uint16, copy=False)


def memmap_shard(path: str | Path) -> np.ndarray:
    """The tokens of a validated shard as a read-only uint16 memory map (nothing read up front)."""
    count = shard_token_count(path)
    if count == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


def resolve_shards(folder: str | Path, pattern: str, what: str) -> list[Path]:
    """Sorted shard paths matching ``folder/pattern``, byte sidecars (``*_bytes_*``) left out; an
    empty match is an error naming the glob."""
    full = str(Path(folder) / pattern)
    # The challenge's val glob also matches the byte sidecars (fineweb_val_bytes_*.bin): never a shard.
    files = sorted(Path(p) for p in globlib.glob(full) if "_bytes_" not in Path(p).name)
    if not files:
        raise DataError(
            f"no {what} shards match {full}; prepare data with `pgolf data prepare` or `pgolf data fetch`, "
            "or point data.path at the folder that holds them"
        )
    return files


def load_tokens(files: list[Path]) -> np.ndarray:
    """Concatenate several shards (validated) into one uint16 array."""
    return np.concatenate([read_shard(f) for f in files]) if files else np.zeros(0, dtype=np.uint16)
