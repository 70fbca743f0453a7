"""Held-out TRAINING tokens for proxy evaluation (``avg.ema_tracks``, issue 16).

The last training shard (in sorted order) is held out of the training loader entirely, and the
proxy reads the last ``n + 1`` tokens of it: tokens from the training distribution that never
trained the model. Validation shards are never opened: the reader takes only the held-out shard,
and refuses a path that does not match ``data.train_glob`` or that matches ``data.val_glob``.
(The stream loader reads the shards in order and would reach the last one only after all the
others, so holding it out costs the record runs nothing; the samplers lose 1 / shards of data.)
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np
import torch

from pgolf.data.shards import memmap_shard
from pgolf.errors import DataError


def holdout_split(train_files: list[Path]) -> tuple[list[Path], Path]:
    """(the shards the loader trains on, the held-out shard): the last shard is held out."""
    if len(train_files) < 2:
        raise DataError(f"avg.ema_tracks: needs at least 2 training shards (the last one is held out for the proxy), found "
                        f"{len(train_files)}; fetch or prepare more shards, or set avg.ema_tracks=[]")
    return list(train_files[:-1]), Path(train_files[-1])


def read_holdout_tokens(path: str | Path, n: int, train_glob: str, val_glob: str) -> torch.Tensor:
    """The last ``min(n + 1, shard size)`` tokens of the held-out training shard ``path`` (int64)."""
    path = Path(path)
    if not fnmatch.fnmatch(path.name, Path(train_glob).name) or fnmatch.fnmatch(path.name, Path(val_glob).name):
        raise DataError(f"{path}: the proxy reads only training shards (data.train_glob={train_glob}, never "
                        f"data.val_glob={val_glob})")
    tokens = memmap_shard(path)
    take = min(n + 1, tokens.size)
    if take < 2:
        raise DataError(f"{path}: the held-out shard has {tokens.size} tokens, too few for a proxy loss")
    return torch.from_numpy(np.array(tokens[tokens.size - take :], dtype=np.int64))
