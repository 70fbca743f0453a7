"""The records' training loaders (frontier.md 3.11), chosen by ``data.loader``:

* ``stream``: the challenge's contiguous stream (``pgolf.data.loader.DistributedTokenLoader``);
* ``shuffled``: ShuffledSequenceLoader (R4/R5): rank r owns the shards ``files[r::world]`` and
  its own PCG64 generator; sequences are drawn without replacement from per-shard permutations;
* ``coprime``: the coprime-stride multi-shard loader (R2/R3): one global sample identical on every
  rank, each rank keeping its interleaved share;
* ``packed``: DocumentPackingLoader (R6/R7): each rank gets one row of ``local`` tokens cut from
  consecutive documents; the model's document-masked attention (``model.doc_attention_window``)
  keeps attention inside each document.

:func:`build_loader` is the one factory; every loader has ``next_batch(global_tokens, seq_len,
grad_accum_steps) -> (x, y)`` and ``state_dict()`` / ``load_state_dict()`` (tensors, ints and
strings only: the checkpoint container stores them without pickle). Every loader is deterministic
for ``data.loader_seed``, gives each rank its own part, resumes exactly from a saved state, and
refuses validation shards and byte sidecars.
"""

from __future__ import annotations

import fnmatch
import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from pgolf.data.config import LOADERS, DataConfig
from pgolf.data.shards import memmap_shard, read_shard
from pgolf.errors import ConfigError, DataError

__all__ = ["LOADERS", "build_loader", "ShuffledSequenceLoader", "CoprimeStrideLoader", "DocumentPackingLoader"]
FNV_PRIME = 1099511628211
COPRIME_RAMP_BATCHES = 1800  # the mixing ramp of the coprime loader (global batches)


class TrainLoader(Protocol):
    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[Tensor, Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def build_loader(cfg_data: DataConfig, files: list[Path], rank: int, world_size: int, device: torch.device, *,
                 doc_window: int | None = None, bos_id: int = 1, rope_scaling: str = "none") -> TrainLoader:
    """The training loader ``cfg_data.loader`` over the training shards ``files``.

    ``doc_window`` is ``model.doc_attention_window``: the packed loader needs it > 0 (attention
    must not cross the packed documents); None skips that check. ``bos_id`` marks documents.
    ``rope_scaling`` is ``model.rope_scaling``: the packed loader refuses ``ntk``, whose base would
    be rescaled by the length of a packed row (~98K tokens; the YaRN trap of frontier.md 3.11)."""
    kind = getattr(cfg_data, "loader", "stream")
    if kind not in LOADERS:
        raise ConfigError(f"data.loader={kind!r} is unknown; use one of {', '.join(LOADERS)}")
    files = check_training_files(files, cfg_data.val_glob)
    check_transform(files[0].parent, getattr(cfg_data, "transform", "none"))
    seed = int(getattr(cfg_data, "loader_seed", 0))
    if kind == "stream":
        from pgolf.data.loader import DistributedTokenLoader

        return DistributedTokenLoader(files, rank, world_size, device, cfg_data.val_glob)
    if kind == "shuffled":
        return ShuffledSequenceLoader(files, rank, world_size, device, seed=seed)
    if kind == "coprime":
        return CoprimeStrideLoader(files, rank, world_size, device, seed=seed)
    if doc_window is not None and doc_window <= 0:
        raise ConfigError(
            "data.loader=packed packs whole documents into one row per rank: set model.doc_attention_window "
            "(2048 in R6/R7) so that attention never crosses a document"
        )
    if rope_scaling == "ntk":
        raise ConfigError("data.loader=packed with model.rope_scaling=ntk would rescale the RoPE base by the packed row's "
                          "length; set model.rope_scaling=none (R6/R7 run with YaRN off)")
    return DocumentPackingLoader(files, rank, world_size, device, bos_id=bos_id)


def check_transform(folder: Path, transform: str) -> None:
    """DataError unless the folder's manifest records ``transform`` (``none``: no transform). A
    folder without a manifest passes only for ``none``."""
    from pgolf.data.manifest import MANIFEST_NAME, read_manifest

    have = "none"
    if (folder / MANIFEST_NAME).is_file():
        have = (read_manifest(folder).get("transform") or {}).get("name", "none")
    if have != transform:
        hint = ("`pgolf data fetch --variant sp8192-caseops` or `pgolf data prepare --caseops`" if transform != "none"
                else f"a data folder without a transform, or --set data.transform={have}")
        raise DataError(f"{folder / MANIFEST_NAME}: the data's transform is {have!r} but data.transform is {transform!r}; use {hint}")


def check_training_files(files: list[Path], val_glob: str) -> list[Path]:
    """The files as sorted Paths; DataError on a validation shard or a byte sidecar among them."""
    files = sorted(Path(f) for f in files)
    if not files:
        raise DataError("no training shards given; check data.path and data.train_glob")
    for f in files:
        if "_bytes_" in f.name or any(fnmatch.fnmatch(f.name, g) for g in (val_glob, "fineweb_val_*")):
            raise DataError(f"{f}: a validation shard (or its byte sidecar) cannot be used as training data; fix data.train_glob")
    return files


def _to_device(x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    xt, yt = torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))
    if device.type == "cuda":
        return xt.pin_memory().to(device, non_blocking=True), yt.pin_memory().to(device, non_blocking=True)
    return xt.to(device), yt.to(device)


def _windows(shards: list[np.ndarray], picks: list[tuple[int, int]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.stack([np.asarray(shards[s][o : o + seq_len + 1]) for s, o in picks]) if picks else np.zeros((0, seq_len + 1), np.uint16)
    return rows[:, :-1], rows[:, 1:]


def _local_sequences(global_tokens: int, seq_len: int, world: int, accum: int) -> int:
    local = global_tokens // (world * accum)
    if global_tokens % (world * accum) or local % seq_len or local == 0:
        raise ConfigError(f"train.train_batch_tokens={global_tokens} must split into whole sequences of {seq_len} over {world} rank(s) x {accum} micro-steps")
    return local // seq_len


def _rng_state(rng: np.random.Generator) -> dict:
    st = rng.bit_generator.state
    return {"state": int(st["state"]["state"]), "inc": int(st["state"]["inc"]), "has_uint32": int(st["has_uint32"]), "uinteger": int(st["uinteger"])}


def _set_rng_state(rng: np.random.Generator, st: dict) -> None:
    rng.bit_generator.state = {"bit_generator": "PCG64", "state": {"state": int(st["state"]), "inc": int(st["inc"])},
                               "has_uint32": int(st["has_uint32"]), "uinteger": int(st["uinteger"])}


def _check_state(state: dict, kind: str, names: list[str]) -> None:
    if state.get("kind") != kind:
        raise DataError(f"the checkpoint's loader is {state.get('kind')!r} but data.loader is {kind!r}; resume with the same data.loader")
    if state.get("files") != names:
        raise DataError(f"the checkpoint's loader read shards {state.get('files', [])[:3]}..., this run has {names[:3]}...; "
                        "resume with the same data folder and data.train_glob")


def _random_phase(rng: np.random.Generator, n: int, seq_len: int) -> int:
    """phase ~ U{0 .. min(L - 1, n - L - 1)} (0 when the shard is too short for a choice)."""
    hi = min(seq_len - 1, n - seq_len - 1)
    return int(rng.integers(0, hi + 1)) if hi > 0 else 0


# ------------------------------------------------------------------------------------------------
class ShuffledSequenceLoader:
    """R4/R5 (frontier.md 3.11): rank r owns ``files[r::world]`` and PCG64(r + world * seed) (the
    records' PCG64(rank) at seed 0). Per shard: a random phase and a random permutation of its
    (n - 1 - phase) // L sequence starts. Each sequence of a batch picks a shard with probability
    proportional to its remaining sequences and pops that shard's last start; when every shard is
    exhausted, all are reshuffled."""

    kind = "shuffled"

    def __init__(self, files: list[Path], rank: int, world_size: int, device: torch.device, *, seed: int = 0):
        own = files[rank::world_size]
        if not own:
            raise DataError(f"data.loader=shuffled gives each rank its own shards, but {len(files)} training shard(s) "
                            f"cannot serve {world_size} ranks; fetch or prepare at least {world_size}")
        self.rank, self.world_size, self.device = rank, world_size, device
        self.names = [f.name for f in own]
        self.shards = [memmap_shard(f) for f in own]
        self.rng = np.random.Generator(np.random.PCG64(rank + world_size * seed))
        self.seq_len = 0
        self.starts: list[np.ndarray] = []
        self.left: list[int] = []

    def _shuffle_all(self) -> None:
        L = self.seq_len
        self.starts, self.left = [], []
        for tok in self.shards:
            n = int(tok.size)
            phase = _random_phase(self.rng, n, L)
            count = max((n - 1 - phase) // L, 0)
            self.starts.append(phase + self.rng.permutation(count).astype(np.int64) * L)
            self.left.append(count)
        if not sum(self.left):
            raise DataError(f"the shards of rank {self.rank} ({self.names[0]}...) hold no sequence of {L + 1} tokens")

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[Tensor, Tensor]:
        b = _local_sequences(global_tokens, seq_len, self.world_size, grad_accum_steps)
        if self.seq_len != seq_len:
            if self.seq_len:
                raise ConfigError(f"data.loader=shuffled was set up for sequences of {self.seq_len}, asked for {seq_len}")
            self.seq_len = seq_len
            self._shuffle_all()
        picks: list[tuple[int, int]] = []
        for _ in range(b):
            total = sum(self.left)
            if total == 0:
                self._shuffle_all()
                total = sum(self.left)
            s = int(self.rng.choice(len(self.left), p=np.asarray(self.left, dtype=np.float64) / total))
            self.left[s] -= 1
            picks.append((s, int(self.starts[s][self.left[s]])))
        x, y = _windows(self.shards, picks, seq_len)
        return _to_device(x, y, self.device)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "files": self.names, "rng": _rng_state(self.rng), "seq_len": self.seq_len,
                "starts": [torch.from_numpy(s.copy()) for s in self.starts], "left": list(self.left)}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, self.kind, self.names)
        _set_rng_state(self.rng, state["rng"])
        self.seq_len = int(state["seq_len"])
        self.starts = [t.numpy().astype(np.int64) for t in state["starts"]]
        self.left = [int(v) for v in state["left"]]


# ------------------------------------------------------------------------------------------------
def coprime_seed(names: list[str], seed: int = 0) -> int:
    """s = 0; for every byte b of every sorted shard name, s = ((s XOR b) * FNV prime) mod 2^64; a
    non-zero ``seed`` is folded in the same way (8 little-endian bytes)."""
    s = 0
    data = b"".join(n.encode("utf-8") for n in sorted(names))
    if seed:
        data += int(seed).to_bytes(8, "little", signed=True)
    for b in data:
        s = ((s ^ b) * FNV_PRIME) % (1 << 64)
    return s


class CoprimeStrideLoader:
    """R2/R3 (frontier.md 3.11). The sample is global and identical on every rank: PCG64 seeded by
    :func:`coprime_seed` over the shard names. Each shard has a cursor visiting its blocks of L
    tokens in the order (start + j * stride) mod bc with gcd(stride, bc) = 1 from a random phase;
    each global batch of G = global_tokens / L windows mixes m shards (8 -> 32 over the first 1,800
    batches, weights r^alpha with alpha 0.9 -> 0.5) and interleaves them.

    Micro-step k of rank r takes windows ``[k * world + r :: world * accum]`` of the global batch,
    so with one micro-step rank r takes ``windows[r::world]`` (the records), and one process with
    accum = 8 sees exactly the windows 8 ranks see."""

    kind = "coprime"

    def __init__(self, files: list[Path], rank: int, world_size: int, device: torch.device, *, seed: int = 0):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.names = [f.name for f in files]
        self.shards = [memmap_shard(f) for f in files]
        self.rng = np.random.Generator(np.random.PCG64(coprime_seed(self.names, seed)))
        self.cursors: list[list[int] | None] = [None] * len(files)  # [phase, bc, start, stride, j]
        self.batches_built = 0
        self.seq_len = 0
        self.pending = np.zeros((0, 2), dtype=np.int64)  # (shard, offset) of the current global batch
        self.served = 0
        self.accum = 0

    def _blocks(self, s: int) -> int:
        c = self.cursors[s]
        return (int(self.shards[s].size) - 1) // self.seq_len if c is None else max(c[1] - c[4], 1)

    def _take(self, s: int, k: int) -> list[int]:
        L, out = self.seq_len, []
        while len(out) < k:
            c = self.cursors[s]
            if c is None or c[4] >= c[1]:
                n = int(self.shards[s].size)
                phase = _random_phase(self.rng, n, L)
                bc = (n - 1 - phase) // L
                start = int(self.rng.integers(0, bc))
                stride = 1
                if bc > 1:
                    stride = int(self.rng.integers(1, bc))
                    while math.gcd(stride, bc) != 1:
                        stride = int(self.rng.integers(1, bc))
                c = self.cursors[s] = [phase, bc, start, stride, 0]
            phase, bc, start, stride, j = c
            out.append(phase + ((start + j * stride) % bc) * L)
            c[4] += 1
        return out

    def _global_batch(self, g: int) -> np.ndarray:
        p = min(self.batches_built / COPRIME_RAMP_BATCHES, 1.0)
        alpha = 0.9 - 0.4 * p
        eligible = np.array([s for s, t in enumerate(self.shards) if int(t.size) >= self.seq_len + 1], dtype=np.int64)
        if eligible.size == 0:
            raise DataError(f"no training shard holds a sequence of {self.seq_len + 1} tokens")
        w = np.array([float(self._blocks(int(s))) ** alpha for s in eligible])
        n_sh, world = eligible.size, self.world_size
        lo = min(max(8, world), n_sh, g)
        hi = min(max(32, 8 * world), n_sh, g)
        m = int(round(lo + p * (hi - lo)))
        chosen = self.rng.choice(n_sh, size=m, replace=False, p=w / w.sum())
        cw = w[chosen] / w[chosen].sum()
        counts = 1 + self.rng.multinomial(g - m, cw)
        buckets: list[list[tuple[int, int]]] = []
        for k in self.rng.permutation(m):
            s = int(eligible[chosen[k]])
            bucket = [(s, o) for o in self._take(s, int(counts[k]))]
            order = self.rng.permutation(len(bucket))
            buckets.append([bucket[i] for i in order])
        out: list[tuple[int, int]] = []
        heads = [0] * len(buckets)
        while len(out) < g:
            live = [i for i in range(len(buckets)) if heads[i] < len(buckets[i])]
            for i in self.rng.permutation(len(live)):
                b = live[i]
                out.append(buckets[b][heads[b]])
                heads[b] += 1
        self.batches_built += 1
        return np.asarray(out, dtype=np.int64)

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[Tensor, Tensor]:
        _local_sequences(global_tokens, seq_len, self.world_size, grad_accum_steps)
        if self.seq_len and self.seq_len != seq_len:
            raise ConfigError(f"data.loader=coprime was set up for sequences of {self.seq_len}, asked for {seq_len}")
        self.seq_len = seq_len
        if self.served >= self.accum or not len(self.pending):
            self.pending = self._global_batch(global_tokens // seq_len)
            self.served, self.accum = 0, grad_accum_steps
        step = self.world_size * self.accum
        mine = self.pending[self.served * self.world_size + self.rank :: step]
        self.served += 1
        x, y = _windows(self.shards, [(int(s), int(o)) for s, o in mine], seq_len)
        return _to_device(x, y, self.device)

    def state_dict(self) -> dict:
        cursors = [[-1] * 5 if c is None else list(c) for c in self.cursors]
        return {"kind": self.kind, "files": self.names, "rng": _rng_state(self.rng), "seq_len": self.seq_len,
                "batches_built": self.batches_built, "cursors": torch.tensor(cursors, dtype=torch.int64),
                "pending": torch.from_numpy(self.pending.copy()), "served": self.served, "accum": self.accum}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, self.kind, self.names)
        _set_rng_state(self.rng, state["rng"])
        self.seq_len, self.batches_built = int(state["seq_len"]), int(state["batches_built"])
        self.cursors = [None if c[0] < 0 else [int(v) for v in c] for c in state["cursors"].tolist()]
        self.pending = state["pending"].numpy().astype(np.int64).reshape(-1, 2)
        self.served, self.accum = int(state["served"]), int(state["accum"])


# ------------------------------------------------------------------------------------------------
class DocumentPackingLoader:
    """R6/R7 (frontier.md 3.11). Walks the sorted training shards in order, wrapping around (the
    next shard is read on a background thread); in each shard the cursor starts at the first BOS.
    Per call: a global span of (local + 1) * world tokens (skipping a shard's tail that cannot hold
    it); rank r takes ``[cursor + r (local + 1), + local + 1)`` as one row x = span[:-1],
    y = span[1:] of shape (1, local). Documents are whole except at the ends of a rank's row (the
    first segment may be a document's tail); the model's document-masked attention cuts the row at
    BOS and every ``model.doc_attention_window`` tokens of a document, as the records'
    ``cu_seqlens``. The target at a document's last position is the next document's BOS."""

    kind = "packed"

    def __init__(self, files: list[Path], rank: int, world_size: int, device: torch.device, *, bos_id: int = 1):
        self.files, self.rank, self.world_size, self.device, self.bos_id = files, rank, world_size, device, bos_id
        self.names = [f.name for f in files]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgolf-shard")
        self._next: tuple[int, Future] | None = None
        self._open(0)

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _read(self, i: int) -> tuple[np.ndarray, int]:
        tokens = read_shard(self.files[i])
        bos = np.flatnonzero(tokens == self.bos_id)
        if not bos.size:
            raise DataError(f"{self.files[i]}: no BOS ({self.bos_id}) in this shard; data.loader=packed needs documents "
                            "stored as BOS + tokens (re-prepare the data)")
        return tokens, int(bos[0])

    def _open(self, i: int, cursor: int | None = None) -> None:
        if self._next is not None and self._next[0] == i:
            self.tokens, first = self._next[1].result()
        else:
            self.tokens, first = self._read(i)
        self.shard, self.cursor = i, first if cursor is None else cursor
        nxt = (i + 1) % len(self.files)
        self._next = (nxt, self._pool.submit(self._read, nxt))  # prefetch on the background thread

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[Tensor, Tensor]:
        local = global_tokens // (self.world_size * grad_accum_steps)
        if local <= 0 or global_tokens % (self.world_size * grad_accum_steps):
            raise ConfigError(f"train.train_batch_tokens={global_tokens} does not split over {self.world_size} rank(s) x {grad_accum_steps} micro-steps")
        span = (local + 1) * self.world_size
        tried = 0
        while self.cursor + span > self.tokens.size:
            tried += 1
            if tried > len(self.files):
                raise DataError(f"no training shard holds a span of {span} tokens after its first BOS; "
                                "lower train.train_batch_tokens or use larger shards")
            self._open((self.shard + 1) % len(self.files))
        a = self.cursor + self.rank * (local + 1)
        row = self.tokens[a : a + local + 1]
        self.cursor += span
        return _to_device(row[None, :-1], row[None, 1:], self.device)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "files": self.names, "shard": self.shard, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, self.kind, self.names)
        self._open(int(state["shard"]), int(state["cursor"]))
