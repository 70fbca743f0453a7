"""Range coding of positive float16 streams (packing ``ftree``): the per-row scales.

An integer format stores one fp16 scale per row. Under SDClip a row's scale is k·std/c of the
row, so a tensor's scales are positive numbers spread over a few hundred units in the last place
(ulps) around their typical value; byte codecs see two bytes whose low one looks random and
spend ~1.4 bytes a scale. The 16-bit patterns of positive halves, read as unsigned integers, are
monotone in the value, so this coder codes ``t = bits - lo`` (``lo`` the smallest pattern) as the
``D`` bits of ``t``, most significant first:

* the first ``T`` levels of that binary tree with an adaptive probability per tree node: the
  probability of a 1 after ``n0`` zeros and ``n1`` ones at the node is (n1 + 1/2) / (n0 + n1 + 1)
  (the Krichevsky–Trofimov estimator), as a 12-bit integer, so that encoder and decoder compute
  the same numbers on any machine (integer arithmetic only);
* the remaining ``D - T`` bits uniformly: within a bin that narrow the density is flat, and an
  adaptive model would only pay to learn that.

The encoder computes the adaptive cost of every level in one pass and keeps the ``T`` with the
smallest total (``T = 0``: all bits uniform). Stream layout::

    u8 version (1), u16 lo, u8 D, u8 T, u32 W, then W little-endian u32 words of the range
    coder's message (every value's T tree decisions, then every value's D - T low bits)

Decoding runs nothing from the stream and checks every field: a bad version, ``T > D``, a
pattern above the largest finite half, a payload of the wrong length or words left over are
``ValueError``.
"""

from __future__ import annotations

import struct

import numpy as np

from pgolf.quant.ctxcoder import PAIRS as _PAIRS  # [P(0), P(1)] of a 12-bit probability, exact in float32
from pgolf.quant.entropy import _constriction

VERSION = 1
MAX_HALF = 0x7BFF  # the bit pattern of the largest finite float16 (65504)
_HEAD = struct.Struct("<BHBBI")


def _p_one(n0: int, n1: int) -> int:
    """The KT probability of a 1 as k/4096, k in 1..4095."""
    return min(4095, max(1, ((2 * n1 + 1) << 12) // (2 * (n0 + n1) + 2)))


def can_code(values: np.ndarray) -> bool:
    """Whether ``values`` (float16) can use this packing: non-empty, finite and positive."""
    return values.dtype == np.float16 and values.size > 0 and bool(np.all(np.isfinite(values)) and np.all(values > 0))


def _tree_pass(t: np.ndarray, depth: int, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first ``levels`` tree decisions of every value, in coding order, with their adaptive
    12-bit probabilities, and the adaptive cost (bits) of each level."""
    counts: list[dict[int, list[int]]] = [{} for _ in range(levels)]
    bits = np.zeros((t.size, levels), dtype=np.int32)
    probs = np.zeros((t.size, levels), dtype=np.int64)
    for i, v in enumerate(t.tolist()):
        node = 1
        for k in range(levels):
            b = (v >> (depth - 1 - k)) & 1
            c = counts[k].setdefault(node, [0, 0])
            probs[i, k] = _p_one(c[0], c[1])
            bits[i, k] = b
            c[b] += 1
            node = (node << 1) | b
    p_coded = np.where(bits == 1, probs, 4096 - probs)
    level_bits = -np.log2(p_coded / 4096).sum(axis=0) if t.size else np.zeros(levels)
    return bits, probs, level_bits


def encode_halves(values: np.ndarray) -> bytes:
    """Code positive finite float16 ``values`` (any shape, flattened) as an ``ftree`` stream."""
    assert can_code(values), "ftree codes non-empty, finite, positive float16 values"
    x = np.ascontiguousarray(values, dtype=np.float16).reshape(-1).view(np.uint16).astype(np.int64)
    lo = int(x.min())
    t = x - lo
    depth = int(t.max()).bit_length()
    bits, probs, level_bits = _tree_pass(t, depth, depth)
    # the tree for the first T levels, uniform bits below: the T with the smallest total
    totals = [float(level_bits[:levels].sum()) + (depth - levels) * t.size for levels in range(depth + 1)]
    levels = int(np.argmin(totals))
    words = np.zeros(0, dtype="<u4")
    if depth:
        c = _constriction()
        enc = c.stream.queue.RangeEncoder()
        if levels:
            enc.encode(bits[:, :levels].reshape(-1), c.stream.model.Categorical(perfect=False), _PAIRS[probs[:, :levels].reshape(-1)])
        if levels < depth:
            low = (t & ((1 << (depth - levels)) - 1)).astype(np.int32)
            enc.encode(low, c.stream.model.Uniform(1 << (depth - levels)))
        words = enc.get_compressed().astype("<u4")
    return _HEAD.pack(VERSION, lo, depth, levels, words.size) + words.tobytes()


def decode_halves(data: bytes, n: int) -> np.ndarray:
    """Inverse of ``encode_halves``: ``n`` float16 values; ValueError if malformed."""
    if n <= 0:
        raise ValueError("ftree stream: no values to decode")
    if len(data) < _HEAD.size:
        raise ValueError("ftree stream: truncated")
    version, lo, depth, levels, nwords = _HEAD.unpack_from(data, 0)
    if version != VERSION:
        raise ValueError(f"ftree stream: version {version}, this pgolf decodes version {VERSION}")
    if levels > depth or depth > 15 or lo == 0 or lo > MAX_HALF:
        raise ValueError(f"ftree stream: bad header (lo {lo}, {depth} bits, {levels} tree levels)")
    if _HEAD.size + 4 * nwords != len(data):
        raise ValueError(f"ftree stream: {len(data) - _HEAD.size} payload bytes, the stream says {4 * nwords}")
    if depth == 0:
        if nwords:
            raise ValueError("ftree stream: equal values carry no payload")
        return np.full(n, lo, dtype=np.uint16).view(np.float16)
    c = _constriction()
    dec = c.stream.queue.RangeDecoder(np.frombuffer(data, dtype="<u4", count=nwords, offset=_HEAD.size).astype(np.uint32))
    family = c.stream.model.Categorical(perfect=False)
    counts: list[dict[int, list[int]]] = [{} for _ in range(levels)]
    t = np.zeros(n, dtype=np.int64)
    try:
        if levels:
            tops = []
            for _ in range(n):
                node = 1
                for k in range(levels):
                    cell = counts[k].setdefault(node, [0, 0])
                    b = int(dec.decode(family, _PAIRS[[_p_one(cell[0], cell[1])]])[0])
                    cell[b] += 1
                    node = (node << 1) | b
                tops.append(node - (1 << levels))
            t = np.asarray(tops, dtype=np.int64) << (depth - levels)
        if levels < depth:
            t |= dec.decode(c.stream.model.Uniform(1 << (depth - levels)), n).astype(np.int64)
        if not dec.maybe_exhausted():
            raise ValueError("ftree stream: range-coder words left over (corrupt payload)")
    except (AssertionError, RuntimeError, OverflowError) as exc:
        raise ValueError(f"ftree stream: corrupt range-coder payload ({str(exc)[:80]})") from None
    x = t + lo
    if int(x.max()) > MAX_HALF:
        raise ValueError("ftree stream: a decoded value is not a finite float16")
    return x.astype(np.uint16).view(np.float16)
