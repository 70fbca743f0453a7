"""Entropy coding of quantised integers with ``constriction``'s range coder, and Shannon bounds.

A tensor's integers arrive as offset values ``u = q - qmin`` in 0..2^N-1, one row per output
feature. The coder's statistics are *row-group x column-group contexts*: rows are sorted by the
spread (mean square of q) of their values and cut into Kr equal groups, columns likewise into Kc
groups, and every (row group, column group) pair has its own frequency table. The group ids are
stored bit-packed. Why this granularity:

* per-row tables would cost more than they save (an int6 row of 512 values codes to ~300 bytes,
  a 64-entry table is ~60 of them);
* one table per tensor misses what row-max scaling leaves behind: rows of different spread (the
  ratio of a row's max to its typical value varies), and columns of different spread (input
  features of different importance), which in a trained matrix is the larger effect;
* the model (tables + group ids) counts toward the bytes, so Kr, Kc (each 1, 2, 4, 8) and every
  table's precision are chosen per tensor to minimise the estimated total:
  ``sum_ctx -sum_s c_s log2(f_s / F)`` payload bits + table bytes + group-id bytes.

The Shannon bound that goes with this coder (``EntropyPlan.bound_bits``) is the order-0 entropy
*per context*: ``sum_ctx sum_s -c_s log2(c_s / n_ctx)``. With Kr = Kc = 1 it is the plain per-tensor
order-0 bound (``tensor_bound_bits``).

Stream layout (the bytes of a container stream whose packing is ``entropy``)::

    u8 Kr, u8 Kc
    Kr*Kc x table: u8 lo, u8 hi, (hi - lo + 1) LEB128 varint frequencies (sum > 0), row-group major
                   (a context whose table has one symbol codes its symbols in zero bits)
    row group ids, bit-packed with log2(Kr) bits (absent when Kr = 1)
    column group ids, bit-packed with log2(Kc) bits (absent when Kc = 1)
    u32 W, then W little-endian u32 words: one range-coder message holding context 0's symbols,
    then context 1's, ...; inside a context the symbols keep row-major order.

Decoding rebuilds each model from the stored integer frequencies
(``Categorical(freqs, perfect=False)``), so encoder and decoder use bit-identical models: the result
is exact and deterministic. Every field is bounds-checked; malformed input raises ``ValueError``
(the container turns it into ``ArtifactError`` naming the file).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from pgolf.errors import MissingDependencyError
from pgolf.quant.bitpack import pack_bits, packed_nbytes, unpack_bits

GROUP_CHOICES = (1, 2, 4, 8)
PRECISION_CHOICES = (8, 10, 12, 14, 16)
_MIN_PER_GROUP = 4  # rows (columns) per group at least, so that a group's statistics mean something
_CODER_OVERHEAD_BYTES = 8  # range-coder flush (<= 1 word) + the word count


def _constriction():
    try:
        import constriction
    except ImportError:
        raise MissingDependencyError("packing 'entropy' needs the 'constriction' package (pip install constriction); no fallback") from None
    return constriction


# ------------------------------------------------------------------------------------------------
# statistics and bounds


def entropy_bits(counts: np.ndarray) -> float:
    """Order-0 Shannon bound in bits of symbols with these counts; a 2-D array is one distribution
    per row, and the bounds are summed."""
    counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    total = counts.sum(axis=1, keepdims=True)
    safe = np.where(counts > 0, counts, 1.0)
    return float(-(np.where(counts > 0, counts * np.log2(safe / np.maximum(total, 1.0)), 0.0)).sum())


def tensor_bound_bits(u: np.ndarray, bits: int) -> float:
    """Order-0 bound of all symbols of a tensor with one distribution (per-tensor statistics)."""
    return entropy_bits(np.bincount(np.asarray(u, dtype=np.int64).reshape(-1), minlength=1 << bits))


@dataclass
class _Table:
    lo: int
    freqs: np.ndarray  # int64 frequencies of symbols lo..hi


def _table_costs(counts: np.ndarray) -> tuple[np.ndarray, list[_Table]]:
    """Vectorised over contexts (rows of ``counts`` [K, A]): for every context the table
    (symbol range lo..hi, integer frequencies at the cheapest precision) and its cost in bits,
    payload ``-sum c log2(f / F)`` plus ``8 * (2 + varint bytes of the frequencies)``."""
    k, a = counts.shape
    c = counts.astype(np.float64)
    present = c > 0
    total = c.sum(axis=1, keepdims=True)
    idx = np.arange(a)[None, :]
    lo = np.where(present.any(axis=1), np.argmax(present, axis=1), 0)
    hi = np.where(present.any(axis=1), a - 1 - np.argmax(present[:, ::-1], axis=1), 0)
    in_range = (idx >= lo[:, None]) & (idx <= hi[:, None])
    best_cost = np.full(k, np.inf)
    best_f = np.zeros((k, a), dtype=np.int64)
    for precision in PRECISION_CHOICES:
        f = np.round(c * ((1 << precision) / np.maximum(total, 1))).astype(np.int64)
        f = np.where(present, np.maximum(f, 1), 0)
        fsum = f.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            payload = -np.where(present, c * np.log2(np.where(present, f, 1) / np.maximum(fsum, 1)), 0.0).sum(axis=1)
        vbytes = np.where(in_range, np.floor(np.log2(np.maximum(f, 1))).astype(np.int64) // 7 + 1, 0).sum(axis=1)
        cost = payload + 8 * (2 + vbytes)
        better = cost < best_cost
        best_cost = np.where(better, cost, best_cost)
        best_f[better] = f[better]
    empty = ~present.any(axis=1)
    best_cost[empty] = 8 * 3
    tables = [_Table(0, np.ones(1, dtype=np.int64)) if empty[i] else _Table(int(lo[i]), best_f[i, lo[i] : hi[i] + 1].copy()) for i in range(k)]
    return best_cost, tables


def _split_groups(spread: np.ndarray, k: int) -> np.ndarray:
    """Group id per index: sorted by spread, cut into k equal-count groups."""
    ids = np.empty(spread.size, dtype=np.int64)
    for g, members in enumerate(np.array_split(np.argsort(spread, kind="stable"), k)):
        ids[members] = g
    return ids


def _id_bits(k: int) -> int:
    return max(1, math.ceil(math.log2(k)))


@dataclass
class EntropyPlan:
    row_groups: np.ndarray  # [R] group id per row
    col_groups: np.ndarray  # [C] group id per column
    kr: int
    kc: int
    tables: list[_Table]  # kr * kc, row-group major
    est_bytes: float
    bound_bits: float  # order-0 bound under these contexts' empirical statistics

    def contexts(self) -> np.ndarray:
        return self.row_groups[:, None] * self.kc + self.col_groups[None, :]


def plan_entropy(u: np.ndarray, bits: int) -> EntropyPlan:
    """Choose the row/column grouping and table precisions that minimise the estimated bytes."""
    assert u.ndim == 2 and u.size > 0
    rows, cols = u.shape
    alphabet = 1 << bits
    q = u.astype(np.float64) - (alphabet / 2)  # centred: the spread is measured around the middle
    row_spread = np.square(q).mean(axis=1)
    col_spread = np.square(q).mean(axis=0)
    flat_u = u.reshape(-1).astype(np.int64)
    best: EntropyPlan | None = None
    for kr in GROUP_CHOICES:
        if kr > 1 and rows < _MIN_PER_GROUP * kr:
            break
        rg = _split_groups(row_spread, kr) if kr > 1 else np.zeros(rows, dtype=np.int64)
        for kc in GROUP_CHOICES:
            if kc > 1 and cols < _MIN_PER_GROUP * kc:
                break
            cg = _split_groups(col_spread, kc) if kc > 1 else np.zeros(cols, dtype=np.int64)
            ctx = (rg[:, None] * kc + cg[None, :]).reshape(-1)
            counts = np.bincount(ctx * alphabet + flat_u, minlength=kr * kc * alphabet).reshape(kr * kc, alphabet)
            costs, tables = _table_costs(counts)
            cost_bits = float(costs.sum())
            side = 2 + (packed_nbytes(rows, _id_bits(kr)) if kr > 1 else 0) + (packed_nbytes(cols, _id_bits(kc)) if kc > 1 else 0)
            est = cost_bits / 8 + side + _CODER_OVERHEAD_BYTES
            if best is None or est < best.est_bytes:
                best = EntropyPlan(rg, cg, kr, kc, tables, est, entropy_bits(counts))
    assert best is not None
    return best


# ------------------------------------------------------------------------------------------------
# coding


def _write_varints(values: np.ndarray) -> bytes:
    out = bytearray()
    for v in values.tolist():
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ValueError("entropy stream: truncated frequency table")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise ValueError("entropy stream: frequency varint too long")


def _model(freqs: np.ndarray):
    return _constriction().stream.model.Categorical(freqs.astype(np.float64), perfect=False)


def encode_entropy(u: np.ndarray, bits: int, plan: EntropyPlan | None = None) -> bytes:
    """Range-code the offset integers ``u`` [R, C] (each < 2^bits) into a self-describing stream."""
    u = np.ascontiguousarray(u, dtype=np.uint8)
    assert u.ndim == 2 and u.size > 0 and 1 <= bits <= 8
    plan = plan or plan_entropy(u, bits)
    out = bytearray([plan.kr, plan.kc])
    for t in plan.tables:
        out += bytes([t.lo, t.lo + len(t.freqs) - 1]) + _write_varints(t.freqs)
    if plan.kr > 1:
        out += pack_bits(plan.row_groups.astype(np.uint8), _id_bits(plan.kr))
    if plan.kc > 1:
        out += pack_bits(plan.col_groups.astype(np.uint8), _id_bits(plan.kc))
    ctx = plan.contexts().reshape(-1)
    order = np.argsort(ctx, kind="stable")  # context-major, row-major inside a context
    sizes = np.bincount(ctx, minlength=len(plan.tables))
    symbols = u.reshape(-1)[order].astype(np.int32)
    encoder = _constriction().stream.queue.RangeEncoder()
    start = 0
    for t, n in zip(plan.tables, sizes.tolist()):
        if n and len(t.freqs) > 1:  # a one-symbol context needs no bits at all
            encoder.encode(symbols[start : start + n] - t.lo, _model(t.freqs))
        start += n
    words = encoder.get_compressed().astype("<u4")
    out += struct.pack("<I", words.size) + words.tobytes()
    return bytes(out)


def _read_ids(data: bytes, pos: int, n: int, k: int, what: str) -> tuple[np.ndarray, int]:
    if k == 1:
        return np.zeros(n, dtype=np.int64), pos
    nbytes = packed_nbytes(n, _id_bits(k))
    if pos + nbytes > len(data):
        raise ValueError(f"entropy stream: truncated {what} group ids")
    ids = unpack_bits(data[pos : pos + nbytes], n, _id_bits(k)).astype(np.int64)
    if ids.size and int(ids.max()) >= k:
        raise ValueError(f"entropy stream: {what} group id out of range")
    return ids, pos + nbytes


@dataclass
class _Header:
    kr: int
    kc: int
    tables: list[_Table]
    row_groups: np.ndarray
    col_groups: np.ndarray
    end: int  # position of the word count


def _parse_header(data: bytes, rows: int, cols: int, bits: int) -> _Header:
    if len(data) < 2:
        raise ValueError("entropy stream: truncated")
    kr, kc = data[0], data[1]
    if kr not in GROUP_CHOICES or kc not in GROUP_CHOICES or kr > max(rows, 1) or kc > max(cols, 1):
        raise ValueError(f"entropy stream: bad group counts {kr}x{kc} for a {rows}x{cols} tensor")
    pos = 2
    tables = []
    for _ in range(kr * kc):
        if pos + 2 > len(data):
            raise ValueError("entropy stream: truncated table header")
        lo, hi = data[pos], data[pos + 1]
        pos += 2
        if lo > hi or hi >= (1 << bits):
            raise ValueError(f"entropy stream: symbol range {lo}..{hi} outside 0..{(1 << bits) - 1}")
        freqs = np.empty(hi - lo + 1, dtype=np.int64)
        for i in range(freqs.size):
            freqs[i], pos = _read_varint(data, pos)
        if freqs.sum() <= 0:
            raise ValueError("entropy stream: empty frequency table")
        tables.append(_Table(lo, freqs))
    row_groups, pos = _read_ids(data, pos, rows, kr, "row")
    col_groups, pos = _read_ids(data, pos, cols, kc, "column")
    return _Header(kr, kc, tables, row_groups, col_groups, pos)


def decode_entropy(data: bytes, rows: int, cols: int, bits: int) -> np.ndarray:
    """Inverse of ``encode_entropy``: the [rows, cols] uint8 offset integers."""
    h = _parse_header(data, rows, cols, bits)
    pos = h.end
    if pos + 4 > len(data):
        raise ValueError("entropy stream: truncated word count")
    (nwords,) = struct.unpack_from("<I", data, pos)
    pos += 4
    if pos + 4 * nwords != len(data):
        raise ValueError(f"entropy stream: {len(data) - pos} payload bytes, the stream says {4 * nwords}")
    words = np.frombuffer(data, dtype="<u4", count=nwords, offset=pos).astype(np.uint32)
    ctx = (h.row_groups[:, None] * h.kc + h.col_groups[None, :]).reshape(-1)
    order = np.argsort(ctx, kind="stable")
    sizes = np.bincount(ctx, minlength=len(h.tables))
    decoder = _constriction().stream.queue.RangeDecoder(words)
    symbols = np.empty(ctx.size, dtype=np.int64)
    start = 0
    for t, n in zip(h.tables, sizes.tolist()):
        if n and len(t.freqs) > 1:
            try:
                symbols[start : start + n] = np.asarray(decoder.decode(_model(t.freqs), n), dtype=np.int64) + t.lo
            except (AssertionError, ValueError, RuntimeError, OverflowError) as exc:  # constriction asserts on invalid data
                raise ValueError(f"entropy stream: corrupt range-coder payload ({str(exc)[:80]})") from None
        else:
            symbols[start : start + n] = t.lo
        start += n
    if not decoder.maybe_exhausted():  # e.g. a stream of more rows than the header's tensor says
        raise ValueError("entropy stream: range-coder words left over after the last symbol (corrupt payload or wrong shape)")
    out = np.empty(ctx.size, dtype=np.uint8)
    out[order] = symbols.astype(np.uint8)
    return out.reshape(rows, cols)


def stream_stats(data: bytes, u: np.ndarray, bits: int) -> dict:
    """For a report: the coder's statistics granularity and the Shannon bound (bits) of ``u``
    under that stream's contexts, and the bytes of its model (tables + group ids)."""
    rows, cols = u.shape
    h = _parse_header(data, rows, cols, bits)
    ctx = (h.row_groups[:, None] * h.kc + h.col_groups[None, :]).reshape(-1)
    alphabet = 1 << bits
    counts = np.bincount(ctx * alphabet + u.reshape(-1).astype(np.int64), minlength=h.kr * h.kc * alphabet)
    return {"contexts": f"{h.kr}x{h.kc}", "bound_bits": entropy_bits(counts.reshape(h.kr * h.kc, alphabet)), "model_bytes": h.end + 4}
