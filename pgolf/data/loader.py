"""Deterministic training-token loader, the challenge's streaming scheme.

Training shards are read strictly in order and wrap around; there is no shuffling or sampling.
Each micro-step takes one contiguous chunk of (local_tokens + 1) * world tokens from the stream and
rank r keeps the r-th span of local_tokens + 1; x is the span without its last token, y without
its first. With grad_accum = base // world, one process with accum k sees exactly the tokens that
k processes with accum 1 see in one step, so runs with different world sizes train identically.

This loader is given training shards only: it refuses any file whose name matches the
validation glob, so no code path can train on validation tokens by pointing the wrong glob at it.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pgolf.data.shards import read_shard
from pgolf.errors import DataError


class TokenStream:
    def __init__(self, files: list[Path], forbidden_glob: str = "fineweb_val_*"):
        bad = [f for f in files if fnmatch.fnmatch(Path(f).name, forbidden_glob)]
        if bad:
            raise DataError(f"{bad[0]}: a validation shard cannot be used as training data; fix data.train_glob")
        if not files:
            raise DataError("no training shards given")
        self.files = [Path(f) for f in files]
        self.file_idx = 0
        self.tokens = read_shard(self.files[0])
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        parts: list[np.ndarray] = []
        remaining = n
        while remaining > 0:
            avail = self.tokens.size - self.pos
            if avail <= 0:
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens = read_shard(self.files[self.file_idx])
                self.pos = 0
                continue
            k = min(remaining, avail)
            parts.append(self.tokens[self.pos : self.pos + k])
            self.pos += k
            remaining -= k
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def state_dict(self) -> dict:
        return {"file_idx": self.file_idx, "pos": self.pos, "files": [f.name for f in self.files]}

    def load_state_dict(self, state: dict) -> None:
        if state["files"] != [f.name for f in self.files]:
            raise DataError(f"the checkpoint's loader read shards {state['files'][:3]}..., this run has "
                            f"{[f.name for f in self.files][:3]}...; resume with the same data folder and data.train_glob")
        self.file_idx = int(state["file_idx"])
        self.tokens = read_shard(self.files[self.file_idx])
        self.pos = int(state["pos"])


class DistributedTokenLoader:
    def __init__(self, files: list[Path], rank: int, world_size: int, device: torch.device, forbidden_glob: str = "fineweb_val_*"):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.stream = TokenStream(files, forbidden_glob)
        self.tokens_taken = 0

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[Tensor, Tensor]:
        local_tokens = global_tokens // (self.world_size * grad_accum_steps)
        assert local_tokens % seq_len == 0, "batch tokens per rank must be a multiple of seq_len"
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)
        self.tokens_taken += chunk.size
        local = torch.from_numpy(chunk[self.rank * span : (self.rank + 1) * span].astype(np.int64))
        x = local[:-1].reshape(-1, seq_len)
        y = local[1:].reshape(-1, seq_len)
        non_blocking = self.device.type == "cuda"
        return x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)

    def state_dict(self) -> dict:
        """The position in the stream (every rank has the same: the stream is global)."""
        return {"kind": "stream", "stream": self.stream.state_dict(), "tokens_taken": self.tokens_taken}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "stream":
            raise DataError(f"the checkpoint's loader is {state.get('kind')!r} but data.loader is 'stream'; "
                            "resume with the same data.loader")
        self.stream.load_state_dict(state["stream"])
        self.tokens_taken = int(state["tokens_taken"])
