"""Bit-packing of every N and the range coder: exact, deterministic, bounds-checked."""

from __future__ import annotations

import numpy as np
import pytest

from pgolf.quant.bitpack import pack_bits, packed_nbytes, unpack_bits
from pgolf.quant.entropy import decode_entropy, encode_entropy, plan_entropy, stream_stats, tensor_bound_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001, (1 << 20) + 13])
def test_bitpack_round_trip_every_width_and_odd_lengths(bits: int, n: int) -> None:
    rng = np.random.default_rng(bits * 1000 + n)
    u = rng.integers(0, 1 << bits, n).astype(np.uint8)
    if n:
        u[0], u[-1] = (1 << bits) - 1, 0  # both extremes present
    data = pack_bits(u, bits)
    assert len(data) == packed_nbytes(n, bits) == (n * bits + 7) // 8
    assert np.array_equal(unpack_bits(data, n, bits), u)


def test_bitpack_layout_is_lsb_first() -> None:
    # 3-bit values 1, 2, 7 -> bits 100 010 111 (LSB first) -> bytes 0b11010001, 0b00000001
    assert pack_bits(np.array([1, 2, 7], np.uint8), 3) == bytes([0b11010001, 0b00000001])


def test_bitpack_rejects_wide_values_and_wrong_lengths() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(np.array([8], np.uint8), 3)
    with pytest.raises(ValueError, match="need"):
        unpack_bits(b"\x00\x00", 9, 3)


def _laplace_ints(rng, shape, bits: int, spread: float = 6.0) -> np.ndarray:
    half = 1 << (bits - 1)
    q = np.clip(np.round(rng.laplace(0, spread, shape)), -half, half - 1)
    return (q + half).astype(np.uint8)


@pytest.mark.parametrize("bits", range(2, 9))
def test_entropy_coder_decodes_to_the_same_integers(bits: int) -> None:
    rng = np.random.default_rng(bits)
    u = _laplace_ints(rng, (97, 61), bits, spread=0.3 * (1 << (bits - 1)))
    data = encode_entropy(u, bits)
    assert np.array_equal(decode_entropy(data, 97, 61, bits), u)
    assert encode_entropy(u, bits) == data  # deterministic


@pytest.mark.parametrize("case", ["constant", "two_symbols", "one_row", "one_column", "extremes"])
def test_entropy_coder_edge_cases(case: str) -> None:
    rng = np.random.default_rng(0)
    u = {
        "constant": np.full((16, 16), 5, np.uint8),
        "two_symbols": rng.integers(0, 2, (40, 33)).astype(np.uint8) * 63,
        "one_row": rng.integers(0, 64, (1, 300)).astype(np.uint8),
        "one_column": rng.integers(0, 64, (300, 1)).astype(np.uint8),
        "extremes": np.array([[0, 63] * 50] * 9, np.uint8),
    }[case]
    data = encode_entropy(u, 6)
    assert np.array_equal(decode_entropy(data, *u.shape, 6), u)


def test_entropy_coder_is_close_to_its_bound_and_uses_contexts() -> None:
    rng = np.random.default_rng(1)
    # columns of very different spread: the context model must beat one table per tensor
    spread = np.exp(rng.normal(0, 0.7, 512))
    q = np.clip(np.round(rng.normal(0, 1, (512, 512)) * spread[None, :] * 4), -32, 31)
    u = (q + 32).astype(np.uint8)
    plan = plan_entropy(u, 6)
    data = encode_entropy(u, 6, plan)
    assert plan.kc > 1
    assert len(data) <= plan.bound_bits / 8 * 1.01 + 64 * plan.kr * plan.kc
    assert len(data) < tensor_bound_bits(u, 6) / 8 * 0.97
    stats = stream_stats(data, u, 6)
    assert stats["contexts"] == f"{plan.kr}x{plan.kc}" and abs(stats["bound_bits"] - plan.bound_bits) < 1e-6


def test_entropy_stream_rejects_malformed_input() -> None:
    u = _laplace_ints(np.random.default_rng(2), (32, 32), 6)
    data = encode_entropy(u, 6)
    for bad in (b"", data[:1], data[:-3], data + b"\x00\x00\x00\x00", bytes([9, 1]) + data[2:], bytes([1, 1, 70, 80]) + data[4:]):
        with pytest.raises(ValueError, match="entropy stream"):
            decode_entropy(bad, 32, 32, 6)
