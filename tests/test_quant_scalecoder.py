"""The ``ftree`` coder of fp16 scale streams and the range-coded LQER factors: exact round trips
(any positive finite halves), fewer bytes than the byte codecs on SDClip-like scales, the tree
depth chosen by cost (flat data codes its bits uniformly), clear errors on malformed streams, and
``packing=auto`` choosing both inside the container with the model restored bit for bit."""

from __future__ import annotations

import struct

import brotli
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from pgolf.quant.config import QuantConfig
from pgolf.quant.container import ChunkPlan, decode_artifact, encode_artifact
from pgolf.quant.export import dequantize_state_dict, quantize_state_dict
from pgolf.quant.scalecoder import MAX_HALF, can_code, decode_halves, encode_halves

_HEAD = struct.Struct("<BHBBI")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, MAX_HALF), min_size=1, max_size=300))
def test_any_positive_finite_halves_round_trip(patterns: list[int]) -> None:
    x = np.array(patterns, dtype=np.uint16).view(np.float16)
    assert can_code(x)
    back = decode_halves(encode_halves(x), x.size)
    assert back.dtype == np.float16 and np.array_equal(back.view(np.uint16), x.view(np.uint16))


def test_sdclip_like_scales_beat_the_byte_codecs_and_flat_data_codes_uniformly() -> None:
    rng = np.random.default_rng(0)
    scales = (0.05 * np.exp(0.08 * rng.standard_normal(4096))).astype(np.float16)  # k·std/c per row
    coded = encode_halves(scales)
    assert len(coded) < 0.95 * len(brotli.compress(scales.tobytes(), quality=11))
    # within 1% of an oracle that knows the patterns' mean and spread (a fitted discretised Gaussian)
    x = scales.view(np.uint16).astype(np.float64)
    oracle = -np.log2(norm.cdf(x + 0.5, x.mean(), x.std()) - norm.cdf(x - 0.5, x.mean(), x.std())).sum() / 8
    assert len(coded) < 1.01 * oracle
    _, _, depth, levels, _ = _HEAD.unpack_from(coded)
    assert 0 < levels < depth  # the tree where the shape is, uniform bits below
    # patterns uniform over a power-of-two range: no tree level pays, every bit is coded flat
    flat = (rng.integers(0, 1 << 10, 4096) + 0x2000).astype(np.uint16).view(np.float16)
    coded = encode_halves(flat)
    _, lo, depth, levels, _ = _HEAD.unpack_from(coded)
    assert levels == 0 and abs(len(coded) - _HEAD.size - 4096 * (depth / 8)) <= 8


def test_equal_values_carry_no_payload() -> None:
    x = np.full(100, 0.25, dtype=np.float16)
    coded = encode_halves(x)
    assert len(coded) == _HEAD.size and np.array_equal(decode_halves(coded, 100), x)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b: bytes([2]) + b[1:], "version 2"),
        (lambda b: b[:5], "truncated"),
        (lambda b: b[:-4], "payload bytes"),
        (lambda b: b[:1] + struct.pack("<H", 0) + b[3:], "bad header"),
        (lambda b: b[:3] + bytes([b[3], b[3] + 1]) + b[5:], "bad header"),  # more tree levels than bits
        (lambda b: b + b"\0\0\0\0", "payload bytes"),
    ],
)
def test_malformed_streams_are_clear_errors(edit, message: str) -> None:
    x = (0.05 * np.exp(0.08 * np.random.default_rng(1).standard_normal(300))).astype(np.float16)
    coded = encode_halves(x)
    with pytest.raises(ValueError, match=message):
        decode_halves(edit(coded), x.size)


def test_a_flipped_payload_bit_never_decodes_silently() -> None:
    x = (0.05 * np.exp(0.08 * np.random.default_rng(2).standard_normal(500))).astype(np.float16)
    coded = bytearray(encode_halves(x))
    caught = 0
    positions = range(_HEAD.size, len(coded), 37)
    for pos in positions:
        bad = bytearray(coded)
        bad[pos] ^= 0x08
        try:
            caught += not np.array_equal(decode_halves(bytes(bad), x.size).view(np.uint16), x.view(np.uint16))
        except ValueError:
            caught += 1
    assert caught == len(positions)  # a different result or an error (the container's CRC32 stops it first)


def test_auto_packing_chooses_ftree_scales_and_range_coded_lqer_factors() -> None:
    g = torch.Generator().manual_seed(3)
    low = torch.randn(512, 2, generator=g) @ torch.randn(2, 64, generator=g)
    state = {
        "tok_emb.weight": torch.randn(512, 64, generator=g) + 0.3 * low,
        "blocks.0.mlp.fc.weight": torch.randn(256, 64, generator=g),
        "blocks.0.attn.c_k.weight": torch.randn(16, 64, generator=g),  # 16 rows: below FTREE_MIN_VALUES
        "q_gain": torch.ones(8),
    }
    cfg = QuantConfig(embed_format="int7:sd:sym", mlp_format="int6:sd:sym", attn_format="int6:sd:sym", small_numel=64, lqer_top_k=1, lqer_rank=4)
    qts = quantize_state_dict(state, cfg)
    assert any(q.lqer is not None for q in qts)
    auto = decode_artifact(encode_artifact(qts, {}, ChunkPlan(default_codec="auto", packing="auto")))
    fixed = decode_artifact(encode_artifact(qts, {}, ChunkPlan(default_codec="zstd-22", packing="bitpack")))
    a, b, c = dequantize_state_dict(qts), dequantize_state_dict(auto.qtensors), dequantize_state_dict(fixed.qtensors)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    info = {i.name: i.streams for i in auto.tensors}
    assert info["tok_emb.weight"]["s"].packing == info["blocks.0.mlp.fc.weight"]["s"].packing == "ftree"
    assert info["blocks.0.attn.c_k.weight"]["s"].packing == "raw"
    lqer_streams = [s for name, streams in info.items() for key, s in streams.items() if key in ("la", "lb")]
    assert lqer_streams and {s.packing for s in lqer_streams} <= {"bitpack", "entropy"}
    assert "entropy" in {s.packing for s in lqer_streams}  # A's mostly-zero int2 codes range-code smaller
    fixed_info = {i.name: i.streams for i in fixed.tensors}
    assert fixed_info["tok_emb.weight"]["s"].packing == "raw"  # an explicit packing keeps raw scales


@pytest.mark.parametrize("scale_dtype", ["fp16", "bf16"])
def test_small_streams_are_decided_per_kind_and_every_scale_dtype_exports(scale_dtype: str) -> None:
    """Scales and float tensors share a chunk: ftree scales and byte-plane floats are separate
    kinds, both switched on when each saves bytes (one never masks the other); bf16 scales (no
    ftree) export and round-trip under every packing."""
    g = torch.Generator().manual_seed(0)
    rowscale = torch.exp(0.1 * torch.randn(256, 1, generator=g))
    state = {"blocks.0.mlp.fc.weight": torch.randn(256, 64, generator=g) * rowscale, "skip_weights": 1 + 0.01 * torch.randn(8, 64, generator=g)}
    qts = quantize_state_dict(state, QuantConfig(mlp_format="int6:sd:sym", control_format="fp32", small_numel=64, scale_dtype=scale_dtype))
    for plan in (ChunkPlan(default_codec="auto", packing="auto"), ChunkPlan(default_codec="brotli", packing="auto"),
                 ChunkPlan(default_codec="zlib-9", packing="int8")):
        contents = decode_artifact(encode_artifact(qts, {}, plan))
        a, b = dequantize_state_dict(qts), dequantize_state_dict(contents.qtensors)
        assert all(torch.equal(a[k], b[k]) for k in a)
        chosen = {(i.name, k): s.packing for i in contents.tensors for k, s in i.streams.items()}
        if plan.packing == "int8":
            assert set(chosen.values()) == {"raw"}
            continue
        assert chosen[("skip_weights", "v")] == "shuffle"
        assert chosen[("blocks.0.mlp.fc.weight", "s")] == ("ftree" if scale_dtype == "fp16" else "raw")
