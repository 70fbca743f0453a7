"""The context coder, the records' byte shuffle and R7's per-group lrzip scheme: exact round
trips, clear errors on corrupted streams, the lrzip scheme skipped cleanly without the binary,
and the codecs table of ``pgolf inspect --artifact --json``."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.errors import ArtifactError, MissingDependencyError
from pgolf.quant.compare import byte_shuffle, byte_unshuffle, codec_comparison, records_blob
from pgolf.quant.config import QuantConfig
from pgolf.quant.container import ChunkPlan, decode_artifact, encode_artifact
from pgolf.quant import ctxcoder
from pgolf.quant.ctxcoder import CTX_VERSION, decode_ctx, encode_ctx
from pgolf.quant.entropy import encode_entropy, tensor_bound_bits
from pgolf.quant.export import dequantize_state_dict, quantize_state_dict
from pgolf.quant.pergroup import GROUPS, decode_pergroup, encode_pergroup, greedy_l1_order, group_of

HAS_LRZIP = shutil.which("lrzip") is not None


def _similar_rows(rows: int = 300, cols: int = 96, seed: int = 0) -> np.ndarray:
    """Offset int6 values whose rows come in families (a shared direction per family + noise),
    shuffled: a neighbour model after reordering beats any order-0 code."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, (12, cols))
    v = centres[rng.integers(0, 12, rows)] + rng.normal(0, 1.0, (rows, cols))
    return (np.clip(np.round(v), -31, 31) + 31).astype(np.uint8)


def test_ctx_round_trip_and_beats_the_order0_bound_on_similar_rows() -> None:
    u = _similar_rows()
    data = encode_ctx(u, 6)
    assert data[0] & 1  # the stored nearest-neighbour order won
    assert np.array_equal(decode_ctx(data, *u.shape, 6), u)
    bound = tensor_bound_bits(u, 6) / 8
    assert len(data) < 0.8 * min(bound, len(encode_entropy(u, 6)))
    # i.i.d. values: no order is stored, and the adaptive code stays close to the bound
    iid = np.random.default_rng(1).integers(20, 43, (200, 128)).astype(np.uint8)
    d2 = encode_ctx(iid, 6)
    assert not d2[0] & 1 and np.array_equal(decode_ctx(d2, *iid.shape, 6), iid)
    assert len(d2) < 1.03 * tensor_bound_bits(iid, 6) / 8


@pytest.mark.parametrize("shape, bits", [((1, 1), 2), ((1, 40), 8), ((37, 1), 3), ((5, 7), 7)])
def test_ctx_edge_shapes(shape, bits: int) -> None:
    u = np.random.default_rng(2).integers(0, 1 << bits, shape).astype(np.uint8)
    for order in (None, np.arange(shape[0])[::-1].copy()):
        d = encode_ctx(u, bits, order=order) if order is not None else encode_ctx(u, bits)
        assert np.array_equal(decode_ctx(d, *shape, bits), u)


def test_ctx_corrupt_streams_are_clear_errors() -> None:
    u = _similar_rows(64, 32)
    data = bytearray(encode_ctx(u, 6))
    assert data[0] & 1 and data[0] >> 1 == CTX_VERSION == 4
    with pytest.raises(ValueError, match="model version 2, this pgolf decodes versions 3, 4"):
        decode_ctx(bytes([5]) + bytes(data[1:]), 64, 32, 6)  # a stream of an unknown model (v2) is refused
    with pytest.raises(ValueError, match="symbols"):
        decode_ctx(bytes(data[:3]) + bytes([40, 30]) + bytes(data[5:]), 64, 32, 6)  # lo > hi
    with pytest.raises(ValueError, match="payload bytes"):
        decode_ctx(bytes(data[:-3]), 64, 32, 6)
    with pytest.raises(ValueError, match="truncated"):
        decode_ctx(bytes(data[:2]), 64, 32, 6)
    one = encode_ctx(np.full((4, 4), 9, dtype=np.uint8), 6)
    assert decode_ctx(one, 4, 4, 6).tolist() == [[9] * 4] * 4
    with pytest.raises(ValueError, match="no payload"):
        decode_ctx(bytes([one[0] | 1]) + one[1:], 4, 4, 6)  # a one-symbol tensor with a row order
    # the range-coded payload (the row order's ranks, then the rows): a flipped bit decodes to
    # symbols outside lo..hi or leaves words over, caught here at almost every position (the
    # container's CRC32 catches the rest)
    caught, positions = 0, range(9, len(data), 23)
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x10
        try:
            caught += not np.array_equal(decode_ctx(bytes(bad), 64, 32, 6), u)
        except ValueError:
            caught += 1
    assert caught == len(positions)


def test_ctx_row_order_ranks() -> None:
    """The stored row order: the rank of each row among those not yet listed (log2 R! bits in
    all), and back."""
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 1000):
        perm = rng.permutation(n)
        ranks = ctxcoder._order_ranks(perm)
        assert np.all(ranks < np.arange(n, 0, -1)) and np.array_equal(ctxcoder._order_from_ranks(ranks), perm)
    assert ctxcoder._order_ranks(np.array([2, 0, 3, 1])).tolist() == [2, 0, 1, 0]
    # the greedy L1 order (its search drops used rows as it goes) is R7's rule, checked by brute force
    u = _similar_rows(300, 24)
    expect, x = [0], u.astype(np.int64)
    for _ in range(299):
        d = np.abs(x - x[expect[-1]]).sum(axis=1)
        d[expect] = 1 << 40
        expect.append(int(np.argmin(d)))
    assert greedy_l1_order(u).tolist() == expect
    # R7's rule on a hand-made case: from row 0 always to the nearest unused row in L1
    rows = np.array([[0, 0], [9, 9], [1, 0], [5, 5], [1, 1]], dtype=np.int8)
    assert greedy_l1_order(rows).tolist() == [0, 2, 4, 3, 1]


def test_ctx_model_is_pinned() -> None:
    """The integer tables the model's probabilities come from, and the model itself, are part of
    the stream format (encoder and decoder derive the same ones on every machine): pinned here.
    A change of the model changes these bytes: it must bump CTX_VERSION."""
    assert ctxcoder.SQUASH.size == 4095 and ctxcoder.SQUASH[0] == 1 and ctxcoder.SQUASH[2047] == 2048 and ctxcoder.SQUASH[-1] == 4095
    assert np.all(np.diff(ctxcoder.SQUASH) >= 0) and np.all(np.diff(ctxcoder.STRETCH) >= 0)
    assert (int(ctxcoder.SQUASH.sum()), int(ctxcoder.STRETCH.sum())) == (8386589, -2076)
    u = _similar_rows(40, 16, seed=7)
    assert zlib.crc32(encode_ctx(u, 6, try_order=False)) == CRC_V4


CRC_V4 = 3930326866  # version 4's bytes; a change of the model must bump CTX_VERSION and re-pin


def test_ctx_version_3_streams_still_decode(monkeypatch) -> None:
    """Artifacts written with model version 3 stay readable: the encoder run with version 3's
    parameters writes the bytes it wrote before version 4 existed (pinned), and they decode."""
    u = _similar_rows(40, 16, seed=7)
    monkeypatch.setattr(ctxcoder, "CTX_VERSION", 3)
    v3 = encode_ctx(u, 6, try_order=False)
    monkeypatch.undo()
    assert v3[0] >> 1 == 3 and zlib.crc32(v3) == 695364724  # the pin of version 3's test above
    assert np.array_equal(decode_ctx(v3, 40, 16, 6), u)
    v4 = encode_ctx(u, 6, try_order=False)
    assert v4[0] >> 1 == 4 and len(v4) < len(v3) and np.array_equal(decode_ctx(v4, 40, 16, 6), u)


def test_ctx_packing_in_the_container() -> None:
    g = torch.Generator().manual_seed(4)
    base = torch.randn(16, 64, generator=g)
    emb = base[torch.randint(0, 16, (512,), generator=g)] + 0.15 * torch.randn(512, 64, generator=g)  # families of rows
    state = {"tok_emb.weight": emb, "blocks.0.mlp.fc.weight": torch.randn(128, 64, generator=g), "q_gain": torch.ones(8)}
    qts = quantize_state_dict(state, QuantConfig(embed_format="int6:sd:sym", mlp_format="int6:sd:sym", small_numel=64))
    for packing in ("ctx", "auto"):
        blob = encode_artifact(qts, {}, ChunkPlan(default_codec="zstd-22", packing=packing))
        contents = decode_artifact(blob)
        a, b = dequantize_state_dict(qts), dequantize_state_dict(contents.qtensors)
        assert all(torch.equal(a[k], b[k]) for k in a)
        chosen = {i.name: i.streams["v"].packing for i in contents.tensors}
        assert chosen["tok_emb.weight"] == "ctx"  # auto picks the context coder where it pays


def test_byte_shuffle_is_the_records_layout() -> None:
    data = bytes(range(7))
    assert byte_shuffle(data) == b"BSHF\x02" + bytes([0, 2, 4, 6, 1, 3, 5])
    for n in (0, 1, 2, 1001):
        d = np.random.default_rng(n).bytes(n)
        assert byte_unshuffle(byte_shuffle(d)) == d
    with pytest.raises(ValueError, match="magic"):
        byte_unshuffle(b"XXXX\x02ab")


def _model_qtensors():
    g = torch.Generator().manual_seed(5)
    state = {"tok_emb.weight": torch.randn(64, 32, generator=g)}
    for i in range(2):
        for n, shape in (("attn.c_q", (32, 32)), ("attn.c_k", (16, 32)), ("attn.c_v", (16, 32)), ("attn.proj", (32, 32)),
                         ("mlp.fc", (64, 32)), ("mlp.proj", (32, 64))):
            state[f"blocks.{i}.{n}.weight"] = torch.randn(*shape, generator=g)
        state[f"blocks.{i}.attn.attn_gate_w"] = torch.randn(4, 12, generator=g)
        state[f"blocks.{i}.attn_scale"] = torch.ones(32)
    cfg = QuantConfig(embed_format="int7:sd:sym", attn_format="int6:sd:sym", mlp_format="int6:sd:sym", small_numel=256,
                      gate_format="int8:max:sym:nofloor", lqer_top_k=2, lqer_rank=2)
    return quantize_state_dict(state, cfg)


def test_groups_are_r7s() -> None:
    assert group_of("tok_emb.weight") == "tok_emb" and group_of("blocks.3.mlp.fc.weight") == "mlp.fc"
    assert group_of("blocks.3.attn.attn_gate_w") is None and group_of("blocks.3.attn.proj.weight") == "attn.proj"
    assert GROUPS == ("tok_emb", "attn.c_k", "attn.c_q", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")


@pytest.mark.skipif(not HAS_LRZIP, reason="the lrzip binary is not installed (apt-get install lrzip)")
def test_pergroup_round_trip_and_corruption() -> None:
    qts = _model_qtensors()
    res = encode_pergroup(qts, {"m": 1})
    meta, back = decode_pergroup(res.blob)
    assert meta == {"m": 1}
    a, b = dequantize_state_dict(qts), dequantize_state_dict(back)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(res.group_values.values()) == sum(q.values.numel() for q in qts if group_of(q.name))
    bad = bytearray(res.blob)
    bad[10] ^= 0xFF  # a stream length
    with pytest.raises(ArtifactError, match="not a valid per-group file"):
        decode_pergroup(bytes(bad), "x.pgrp")
    with pytest.raises(ArtifactError, match="bad magic"):
        decode_pergroup(b"PK" + res.blob[2:], "x.pgrp")


def test_pergroup_without_lrzip_is_skipped_with_a_reason(monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    qts = _model_qtensors()
    with pytest.raises(MissingDependencyError, match="needs the lrzip system binary"):
        encode_pergroup(qts)
    table = codec_comparison(qts, 12345, {q.name: 10.0 for q in qts if q.scale is not None})
    assert table["codecs"]["lrzip-pergroup"] is None and "lrzip" in table["lrzip_note"]
    assert all(r["lrzip-pergroup"] is None for r in table["codec_groups"])


def test_codec_table_of_inspect(tmp_path: Path, monkeypatch, capsys) -> None:
    from pgolf.cli import main

    monkeypatch.setattr(shutil, "which", lambda name: None)  # fast and deterministic: no lrzip here
    qts = _model_qtensors()
    path = tmp_path / "a.pgolf"
    from pgolf.quant.container import write_bytes_atomic

    blob = encode_artifact(qts, {"format": "pgolf-artifact", "model": {}}, ChunkPlan(default_codec="brotli", packing="auto"))
    write_bytes_atomic(path, blob)
    assert main(["inspect", "--artifact", str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    c = rep["codecs"]
    assert set(c) == {"pgolf", "zstd-22", "brotli-11-shuffle", "lrzip-pergroup", "entropy_bound"}
    assert c["pgolf"] == len(blob) and c["lrzip-pergroup"] is None
    from pgolf.quant.codecs import compress
    from pgolf.quant.compare import brotli_shuffle

    assert c["zstd-22"] == len(compress("zstd-22", records_blob(qts))) and c["brotli-11-shuffle"] == len(brotli_shuffle(records_blob(qts)))
    groups = {r["group"]: r for r in rep["codec_groups"]}
    assert set(groups) == set(GROUPS) | {"other ints", "rest"}
    assert groups["mlp.fc"]["values"] == 2 * 64 * 32
    ints = sum(r["pgolf"] for g, r in groups.items() if g != "rest")
    assert abs(ints + groups["rest"]["pgolf"] - len(blob)) <= len(groups)  # the groups partition the file (rounding)
    assert main(["inspect", "--artifact", str(path), "--codecs", "none", "--json"]) == 0
    assert "codecs" not in json.loads(capsys.readouterr().out)


@pytest.mark.skipif(not HAS_LRZIP, reason="the lrzip binary is not installed (apt-get install lrzip)")
def test_codec_table_of_inspect_with_lrzip(tmp_path: Path, capsys) -> None:
    from pgolf.cli import main
    from pgolf.quant.container import write_bytes_atomic

    qts = _model_qtensors()
    path = tmp_path / "a.pgolf"
    write_bytes_atomic(path, encode_artifact(qts, {"format": "pgolf-artifact", "model": {}}, ChunkPlan(default_codec="brotli", packing="auto")))
    assert main(["inspect", "--artifact", str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    res = encode_pergroup(qts)
    assert rep["codecs"]["lrzip-pergroup"] == len(res.blob) and "lrzip_note" not in rep
    groups = {r["group"]: r for r in rep["codec_groups"]}
    assert all(groups[g]["lrzip-pergroup"] == res.group_bytes[g] for g in GROUPS if g in groups)
    assert groups["rest"]["lrzip-pergroup"] == res.remainder_bytes + res.perm_bytes + res.overhead_bytes


def test_ctx_decode_budget_keeps_the_largest_saving_per_value(monkeypatch) -> None:
    """Above CTX_MAX_VALUES integers on `ctx`, the tensors with the largest saving per value keep
    it and the others take their best other packing; the artifact still decodes exactly; an
    explicit packing="ctx" is what the user asked for and is kept whatever the budget."""
    from pgolf.quant import container
    from pgolf.quant.codecs import compress
    from pgolf.quant.formats import parse_format
    from pgolf.quant.streams import pack_ints

    g = torch.Generator().manual_seed(4)
    state = {}
    for name, noise in (("tok_emb.weight", 0.05), ("blocks.0.mlp.fc.weight", 0.15)):  # families of rows: ctx wins on both
        base = torch.randn(16, 64, generator=g)
        state[name] = base[torch.randint(0, 16, (512,), generator=g)] + noise * torch.randn(512, 64, generator=g)
    qts = quantize_state_dict(state, QuantConfig(embed_format="int6:sd:sym", mlp_format="int6:sd:sym", small_numel=64))

    def chosen(plan):
        contents = decode_artifact(encode_artifact(qts, {}, plan))
        a, b = dequantize_state_dict(qts), dequantize_state_dict(contents.qtensors)
        assert all(torch.equal(a[k], b[k]) for k in a)
        return {i.name: i.streams["v"].packing for i in contents.tensors}

    auto = ChunkPlan(default_codec="zstd-22", packing="auto")
    assert chosen(auto) == {"tok_emb.weight": "ctx", "blocks.0.mlp.fc.weight": "ctx"}
    sizes = {}
    for qt in qts:  # the saving per value of each, measured as _decide measures it
        if qt.name not in state:
            continue
        name = qt.name
        ctx = len(pack_ints(qt.values, parse_format(qt.fmt), "ctx"))
        plain = min(len(pack_ints(qt.values, parse_format(qt.fmt), "entropy")),
                    len(compress("zstd-22", pack_ints(qt.values, parse_format(qt.fmt), "bitpack"))))
        sizes[name] = plain - (ctx + ctx // container.CTX_MIN_GAIN)
    winner = max(sizes, key=sizes.get)  # equal value counts: the larger saving per value
    monkeypatch.setattr(container, "CTX_MAX_VALUES", 512 * 64)  # room for one of the two
    got = chosen(auto)
    (loser,) = set(sizes) - {winner}
    assert sizes[winner] > sizes[loser] > 0 and got[winner] == "ctx" and got[loser] != "ctx"
    monkeypatch.setattr(container, "CTX_MAX_VALUES", 100)  # room for none
    assert "ctx" not in chosen(auto).values()
    assert set(chosen(ChunkPlan(default_codec="zstd-22", packing="ctx")).values()) == {"ctx"}
