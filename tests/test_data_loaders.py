"""The shuffled (R4/R5) and coprime-stride (R2/R3) training loaders, and the loader factory:
determinism for a seed, rank disjointness, exact resume through the checkpoint container, and
no validation shard or byte sidecar ever read."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.data.config import DataConfig
from pgolf.data.loader import DistributedTokenLoader
from pgolf.data.loaders import CoprimeStrideLoader, ShuffledSequenceLoader, build_loader, coprime_seed
from pgolf.data.shards import write_shard
from pgolf.errors import ConfigError, DataError
from pgolf.train.checkpoint import decode_state, encode_state

CPU = torch.device("cpu")
L = 8
SHARD_TOKENS = [3001, 2203, 1609, 2807, 1201, 2405]


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    """Shards whose tokens are their global position + 2 (mod 60000): every window names its origin."""
    files, base = [], 0
    for i, n in enumerate(SHARD_TOKENS):
        path = tmp_path / f"fineweb_train_{i:06d}.bin"
        write_shard(path, (np.arange(base, base + n) % 60000 + 2).astype(np.uint16))
        files.append(path)
        base += n
    return files


def origin(first_token: int) -> tuple[int, int]:
    """(shard, offset) of a window from its first token."""
    g = first_token - 2
    for s, n in enumerate(SHARD_TOKENS):
        if g < n:
            return s, g
        g -= n
    raise AssertionError(first_token)


def draw(loader, calls: int, global_tokens: int = 32 * L, accum: int = 1) -> list[torch.Tensor]:
    out = []
    for _ in range(calls):
        x, y = loader.next_batch(global_tokens, L, accum)
        assert x.shape == y.shape and x.shape[1] == L and torch.equal(x[:, 1:], y[:, :-1])
        out.append(x)
    return out


def roundtrip(state: dict, tmp_path: Path) -> dict:
    """Through the checkpoint container (tensors and JSON, no pickle)."""
    path = tmp_path / "state.pgolf"
    path.write_bytes(encode_state({"loader": state}))
    return decode_state(path)["loader"]


@pytest.mark.parametrize("kind", ["shuffled", "coprime"])
def test_deterministic_for_a_seed_and_seeds_differ(shards: list[Path], kind: str) -> None:
    a = draw(build_loader(DataConfig(loader=kind), shards, 0, 2, CPU), 6)
    b = draw(build_loader(DataConfig(loader=kind), shards, 0, 2, CPU), 6)
    c = draw(build_loader(DataConfig(loader=kind, loader_seed=7), shards, 0, 2, CPU), 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("kind", ["stream", "shuffled", "coprime"])
def test_resume_from_a_saved_state_continues_exactly(shards: list[Path], kind: str, tmp_path: Path) -> None:
    first = build_loader(DataConfig(loader=kind), shards, 1, 2, CPU)
    draw(first, 40, accum=2)  # the shuffled loader's 3 shards reshuffle after ~100 sequences
    state = roundtrip(first.state_dict(), tmp_path)
    want = draw(first, 60, accum=2)
    resumed = build_loader(DataConfig(loader=kind), shards, 1, 2, CPU)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(want, draw(resumed, 60, accum=2)))
    other = "coprime" if kind == "shuffled" else "shuffled"
    with pytest.raises(DataError, match=f"the checkpoint's loader is '{kind}' but data.loader is '{other}'"):
        build_loader(DataConfig(loader=other), shards, 1, 2, CPU).load_state_dict(state)
    if kind != "stream":
        with pytest.raises(DataError, match=f"the checkpoint's loader is '{kind}' but data.loader is 'stream'"):
            build_loader(DataConfig(loader="stream"), shards, 1, 2, CPU).load_state_dict(state)


def test_shuffled_ranks_own_disjoint_shards_and_draw_without_replacement(shards: list[Path]) -> None:
    world = 3
    for rank in range(world):
        loader = ShuffledSequenceLoader(shards, rank, world, CPU)
        own = set(range(rank, len(shards), world))
        total = sum((SHARD_TOKENS[s] - 1 - 0) // L for s in own)  # sequences per epoch, at most
        seen: list[tuple[int, int]] = []
        for x in draw(loader, 1, global_tokens=world * 8 * L):
            seen += [origin(int(t)) for t in x[:, 0]]
        while len(seen) < total - 3 * L:  # most of one epoch
            seen += [origin(int(t)) for t in draw(loader, 1, global_tokens=world * 8 * L)[0][:, 0]]
        assert {s for s, _ in seen} == own  # only this rank's shards, all of them
        assert len(set(seen)) == len(seen)  # no sequence twice within an epoch
        phases = {s: {o % L for s2, o in seen if s2 == s} for s in own}
        assert all(len(p) == 1 for p in phases.values())  # one phase per shard per epoch


def test_coprime_cursor_visits_every_block_once_per_cycle(shards: list[Path]) -> None:
    loader = CoprimeStrideLoader(shards, 0, 1, CPU)
    loader.seq_len = L
    for _ in range(2):  # two cycles of shard 2, each from its own random phase, start and stride
        cycle = loader._take(2, 1)
        phase, bc, start, stride, _ = loader.cursors[2]
        cycle += loader._take(2, bc - 1)
        assert math.gcd(stride, bc) == 1 and 0 <= phase < L and bc == (SHARD_TOKENS[2] - 1 - phase) // L
        assert sorted(cycle) == [phase + k * L for k in range(bc)]  # a permutation of the blocks
        assert [(o - phase) // L for o in cycle[:3]] == [(start + j * stride) % bc for j in range(3)]


def test_coprime_sample_is_global_split_across_ranks_and_world_size_invariant(shards: list[Path]) -> None:
    g = 32
    one = CoprimeStrideLoader(shards, 0, 1, CPU)
    world4 = [CoprimeStrideLoader(shards, r, 4, CPU) for r in range(4)]
    accum4 = CoprimeStrideLoader(shards, 0, 1, CPU)
    for _ in range(3):
        full = {origin(int(t)) for t in one.next_batch(g * L, L, 1)[0][:, 0]}
        parts = [{origin(int(t)) for t in w.next_batch(g * L, L, 1)[0][:, 0]} for w in world4]
        assert sum(len(p) for p in parts) == g and set().union(*parts) == full  # disjoint, complete
        micro = [{origin(int(t)) for t in accum4.next_batch(g * L, L, 4)[0][:, 0]} for _ in range(4)]
        assert micro == parts  # 1 process x 4 micro-steps sees what 4 ranks see
    assert len({s for s, _ in full}) >= 6  # the batch mixes every shard (lo = min(8, #shards, G))


def test_coprime_seed_is_fnv_over_sorted_names() -> None:
    s = 0
    for b in b"ab":
        s = ((s ^ b) * 1099511628211) % (1 << 64)
    assert coprime_seed(["b", "a"]) == s
    assert coprime_seed(["a", "b"], 1) != s


def test_factory_refuses_validation_shards_and_sidecars(shards: list[Path], tmp_path: Path) -> None:
    val = tmp_path / "fineweb_val_000000.bin"
    write_shard(val, np.arange(50, dtype=np.uint16))
    side = tmp_path / "fineweb_val_bytes_000000.bin"
    write_shard(side, np.ones(50, dtype=np.uint16))
    for kind in ("stream", "shuffled", "coprime", "packed"):
        for bad in (val, side):
            with pytest.raises(DataError, match=rf"{bad}: a validation shard .* cannot be used as training data"):
                build_loader(DataConfig(loader=kind), shards + [bad], 0, 1, CPU, doc_window=16)
    assert isinstance(build_loader(DataConfig(), shards, 0, 1, CPU), DistributedTokenLoader)
    with pytest.raises(ConfigError, match="data.loader='random' is unknown; use one of stream, shuffled, coprime, packed"):
        DataConfig(loader="random").validate()
    with pytest.raises(DataError, match="6 training shard.*cannot serve 8 ranks"):
        build_loader(DataConfig(loader="shuffled"), shards, 7, 8, CPU)
