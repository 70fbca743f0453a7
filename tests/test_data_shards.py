"""The shard format, its error messages, document splitting, and the distributed token loader."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.data.loader import DistributedTokenLoader
from pgolf.data.manifest import doc_hash, document_hashes, iter_documents
from pgolf.data.shards import HEADER_BYTES, load_tokens, read_shard, resolve_shards, shard_token_count, write_shard
from pgolf.errors import DataError


@pytest.mark.parametrize("tokens", [np.zeros(0, np.uint16), np.array([1, 0, 65535, 2, 1023], np.uint16),
                                    np.arange(70_000, dtype=np.int64) % 65536])
def test_round_trip(tmp_path: Path, tokens: np.ndarray) -> None:
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, tokens)
    assert path.stat().st_size == HEADER_BYTES + 2 * tokens.size
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [20240520, 1, tokens.size]
    back = read_shard(path)
    assert back.dtype == np.uint16 and np.array_equal(back, tokens)
    assert shard_token_count(path) == tokens.size
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temp file


def test_out_of_range_tokens_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="uint16"):
        write_shard(tmp_path / "x.bin", np.array([0, 65536]))
    assert not (tmp_path / "x.bin").exists()


def _shard_bytes(tmp_path: Path, n: int = 10) -> bytearray:
    write_shard(tmp_path / "good.bin", np.arange(n, dtype=np.uint16))
    return bytearray((tmp_path / "good.bin").read_bytes())


def _set_word(raw: bytearray, index: int, value: int) -> bytearray:
    raw[4 * index : 4 * index + 4] = value.to_bytes(4, "little", signed=True)
    return raw


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[:100], r"truncated shard header \(100 of 1024 bytes\)"),
        (lambda raw: _set_word(raw, 0, 12345), r"not a token shard \(magic 12345, expected 20240520\)"),
        (lambda raw: _set_word(raw, 1, 2), r"unsupported shard version 2"),
        (lambda raw: raw[:-2], r"shard truncated: header says 10 tokens"),
        (lambda raw: raw + b"\x00\x00", r"shard has trailing bytes: header says 10 tokens"),
        (lambda raw: _set_word(raw, 2, 11), r"shard truncated: header says 11 tokens"),
    ],
    ids=["short-header", "magic", "version", "truncated", "trailing", "count-too-big"],
)
def test_damaged_shards_raise_data_error_naming_the_file(tmp_path: Path, damage, message: str) -> None:
    bad = tmp_path / "fineweb_val_000007.bin"
    bad.write_bytes(bytes(damage(_shard_bytes(tmp_path))))
    for reader in (shard_token_count, read_shard):
        with pytest.raises(DataError, match=message) as info:
            reader(bad)
        assert str(info.value).startswith(str(bad))


def test_missing_shard_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read shard"):
        read_shard(tmp_path / "nope.bin")


def test_empty_glob_names_the_pattern(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no training shards match .*fineweb_train_\*\.bin; prepare data"):
        resolve_shards(tmp_path, "fineweb_train_*.bin", "training")


def test_resolve_sorts_and_load_tokens_concatenates(tmp_path: Path) -> None:
    for i in (2, 0, 1):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", np.full(3, i, np.uint16))
    files = resolve_shards(tmp_path, "fineweb_train_*.bin", "training")
    assert [f.name for f in files] == [f"fineweb_train_{i:06d}.bin" for i in range(3)]
    assert load_tokens(files).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_documents_split_at_bos_and_continue_across_shards() -> None:
    stream = np.array([1, 5, 6, 1, 7, 1, 1, 8, 9, 10], np.uint16)
    docs = [d.tolist() for d in iter_documents([stream])]
    assert docs == [[5, 6], [7], [], [8, 9, 10]]
    for cut in range(stream.size + 1):  # the same documents whatever the shard boundary
        assert [d.tolist() for d in iter_documents([stream[:cut], stream[cut:]])] == docs
    assert [d.tolist() for d in iter_documents([np.array([4, 4, 1, 5], np.uint16)])] == [[4, 4], [5]]  # headless start
    hashes = document_hashes(stream)
    assert hashes[0] == doc_hash(np.array([5, 6], np.uint16)) and len(hashes) == 4
    # The hash is of the little-endian uint16 bytes of the ids, BOS excluded.
    assert hashes[0] == hashlib.blake2b(b"\x05\x00\x06\x00", digest_size=8).hexdigest()
    assert document_hashes(np.array([9, 5, 6, 9], np.uint16), bos_id=9)[:1] == hashes[:1]


def _stream_files(tmp_path: Path, sizes: list[int]) -> tuple[list[Path], np.ndarray]:
    stream = np.arange(sum(sizes), dtype=np.uint16) % 1000
    files, start = [], 0
    for i, size in enumerate(sizes):
        path = tmp_path / f"fineweb_train_{i:06d}.bin"
        write_shard(path, stream[start : start + size])
        files.append(path)
        start += size
    return files, stream


def test_loader_rank_r_gets_the_r_th_span(tmp_path: Path) -> None:
    files, stream = _stream_files(tmp_path, [50, 37, 80])  # chunks cross shard boundaries
    world, seq, global_tokens = 3, 4, 24
    local = global_tokens // world
    span = local + 1
    loaders = [DistributedTokenLoader(files, r, world, torch.device("cpu")) for r in range(world)]
    for step in range(3):  # 3 steps x 27 tokens = 81 > the first shard
        base = step * span * world
        for r, loader in enumerate(loaders):
            x, y = loader.next_batch(global_tokens, seq, 1)
            expected = torch.from_numpy(stream[base + r * span : base + (r + 1) * span].astype(np.int64))
            assert x.shape == (local // seq, seq) and x.dtype == torch.int64
            assert torch.equal(x.flatten(), expected[:-1]) and torch.equal(y.flatten(), expected[1:])


def test_loader_wraps_around_to_the_first_shard(tmp_path: Path) -> None:
    files, stream = _stream_files(tmp_path, [10, 10])
    loader = DistributedTokenLoader(files, 0, 1, torch.device("cpu"))
    batches = [loader.next_batch(8, 8, 1) for _ in range(3)]
    seen = torch.cat([torch.cat([x.flatten(), y.flatten()[-1:]]) for x, y in batches])
    assert seen.tolist() == np.concatenate([stream, stream])[:27].tolist()


def test_one_process_with_accumulation_sees_what_two_ranks_see(tmp_path: Path) -> None:
    files, _ = _stream_files(tmp_path, [64, 64])
    single = DistributedTokenLoader(files, 0, 1, torch.device("cpu"))
    ranks = [DistributedTokenLoader(files, r, 2, torch.device("cpu")) for r in range(2)]
    for _ in range(4):
        micro = [single.next_batch(32, 8, 2) for _ in range(2)]  # accum 2 on one process
        per_rank = [loader.next_batch(32, 8, 1) for loader in ranks]  # accum 1 on two ranks
        for (x1, y1), (x2, y2) in zip(micro, per_rank):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_loader_refuses_a_validation_shard(tmp_path: Path) -> None:
    val = tmp_path / "fineweb_val_000000.bin"
    write_shard(val, np.arange(20, dtype=np.uint16))
    train, _ = _stream_files(tmp_path, [20])
    with pytest.raises(DataError, match=r"fineweb_val_000000\.bin: a validation shard cannot be used as training data"):
        DistributedTokenLoader(train + [val], 0, 1, torch.device("cpu"))
