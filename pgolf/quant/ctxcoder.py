"""Context-modelling range coder of quantised integers (packing ``ctx``).

The order-0 coder (``entropy.py``) is within 0.2% of the order-0 bound of its contexts; what the
records' compressors exploit beyond that is *neighbouring rows*: R7 reorders rows so that similar
ones are adjacent and stores matrices transposed, so that ZPAQ's byte contexts see the value of
the previous row in the same column. This coder models that directly:

* **Row order.** Optionally the rows are coded in greedy L1 nearest-neighbour order (R7's rule:
  start at row 0, repeatedly the unused row closest to the last one); the permutation is stored
  bit-packed with ceil(log2 R) bits a row. The encoder codes both orders and keeps the smaller.
* **Context** of the value at (row r, column c), both known to the decoder before row r:
  the value of the previous row (in coding order) in column c, bucketed sign-symmetrically by
  |v| into 0, 1, 2, 3-4, 5-7, 8-11, 12-17, 18+ (15 classes), times a column class (3 classes:
  the column's mean |v| over the rows coded so far below 0.8x, within, or above 1.25x the
  tensor's running mean; the middle class for the first 4 rows): 45 contexts.
* **Adaptive probabilities.** Every context has integer counts over the alphabet, initialised to
  a discretised Gaussian of the tensor's spread (a stored fp16 sigma) plus 1, incremented by
  ``INC`` for each coded symbol and halved (floor, kept >= 1) when their total passes ``LIMIT``.
  The counts are integers, so encoder and decoder derive bit-identical probabilities (one IEEE
  division each) whatever the machine; ``constriction``'s range coder codes a row at a time with
  a per-symbol probability table (``Categorical`` with rank-2 probabilities, ``perfect=False``).

Decoding is row-sequential but vectorised within a row: ~0.2-0.3 ms a row, so a 36M-parameter
model (~53k rows) decodes in seconds. Nothing in the stream is executed; every field is checked.

Stream layout::

    u8 flags (bit 0: rows reordered; bits 1-7: the model version, 2), f16 sigma, u8 lo, u8 hi
    (the symbols' range: the tables cover lo..hi only),
    [permutation: R values of ceil(log2 R) bits, bit-packed]   (when reordered)
    u32 W, W little-endian u32 words: the range coder's message.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from pgolf.quant.bitpack import packed_nbytes

EDGES = np.arange(1, 16, dtype=np.int64)  # |v| bucket edges: 0, 1, ..., 14, 15+ (v = q, centred)
N_PREV = 2 * len(EDGES) + 1  # 31 sign-symmetric classes
N_COL = 3
INC = 48
LIMIT = 1 << 16
PRIOR_WEIGHT = 256  # prior pseudo-count mass (INC = one symbol)
CTX_VERSION = 2  # the model below; a stream of another version is refused (never decoded wrongly)
MIX_LR = 0.02
MIX_FLOOR = 0.02
_COL_WARMUP = 4


def _constriction():
    from pgolf.quant.entropy import _constriction as c

    return c()


def _prior_row(alphabet: int, sigma: float) -> np.ndarray:
    """Initial integer counts of one context: a discretised Gaussian around the centre + 1."""
    x = np.arange(alphabet, dtype=np.float64) - alphabet // 2
    s = max(float(sigma), 0.5)
    g = np.exp(-0.5 * (x / s) ** 2)
    return np.floor(PRIOR_WEIGHT * g / g.sum()).astype(np.int64) + 1


def _prev_class(prev: np.ndarray) -> np.ndarray:
    mag = np.searchsorted(EDGES, np.abs(prev), side="right")
    return np.sign(prev) * mag + len(EDGES)


class _Counts:
    """Adaptive integer counts of K contexts: integer arithmetic only, so the probabilities that
    encoder and decoder derive from them (one IEEE division each) are bit-identical."""

    def __init__(self, k: int, prior: np.ndarray):
        self.counts = np.tile(prior, (k, 1))
        self.totals = self.counts.sum(axis=1)

    def table(self, ctx: np.ndarray | None) -> np.ndarray:
        """float32 probabilities [len(ctx), A]; ``ctx=None``: every context in order."""
        if ctx is None:
            return self.counts.astype(np.float32) / self.totals.astype(np.float32)[:, None]
        return self.counts[ctx].astype(np.float32) / self.totals[ctx].astype(np.float32)[:, None]

    def prob(self, ctx: np.ndarray, sym: np.ndarray) -> np.ndarray:
        return self.counts[ctx, sym].astype(np.float32) / self.totals[ctx].astype(np.float32)

    def update(self, ctx: np.ndarray | None, sym: np.ndarray) -> None:
        """Count the row's symbols; ``ctx=None``: context i for symbol i (the column model)."""
        k, a = self.counts.shape
        if ctx is None:
            self.counts[np.arange(k), sym] += INC
            touched = np.arange(k)
        else:
            hits = np.bincount(ctx * a + sym, minlength=k * a).reshape(k, a)
            self.counts += INC * hits
            touched = np.flatnonzero(hits.any(axis=1))
        self.totals[touched] = self.counts[touched].sum(axis=1)
        full = touched[self.totals[touched] > LIMIT]
        if full.size:
            self.counts[full] = np.maximum(self.counts[full] // 2, 1)
            self.totals[full] = self.counts[full].sum(axis=1)


class _Model:
    """The adaptive state shared, step for step, by encoder and decoder: three count models mixed
    linearly with weights learned per context of the first (online gradient of the code length):

    * the previous row's value in the column (31 classes) x the column's spread class (3);
    * the value two rows back (31 classes);
    * the column itself (one context per column: its own distribution).

    Every floating-point operation is elementwise (no reductions whose order could differ between
    machines), so the mixed probabilities are reproducible bit for bit."""

    def __init__(self, lo: int, hi: int, centre: int, cols: int, sigma: float):
        self.lo, self.centre = lo, centre  # symbols are u - lo, u in lo..hi; v = u - centre
        prior = _prior_row(2 * centre + 1, sigma)[lo : hi + 1]  # the Gaussian around the grid's centre, cut to lo..hi
        self.models = [_Counts(N_PREV * N_COL, prior), _Counts(N_PREV, prior), _Counts(cols, prior)]
        self.weights = np.full((N_PREV * N_COL, 3), 1.0 / 3.0, dtype=np.float32)
        self.prev = np.zeros(cols, dtype=np.int64)
        self.prev2 = np.zeros(cols, dtype=np.int64)
        self.col_abs = np.zeros(cols, dtype=np.int64)
        self.rows_seen = 0
        self.columns = np.arange(cols)

    def contexts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ctx = _prev_class(self.prev) * N_COL
        if self.rows_seen >= _COL_WARMUP:
            # column mean |v| vs the mean over columns, compared in integers: col * n_cols vs total
            scaled = self.col_abs * self.col_abs.size
            total = int(self.col_abs.sum())
            cls = np.where(5 * scaled < 4 * total, 0, np.where(4 * scaled > 5 * total, 2, 1))
        else:
            cls = 1
        return ctx + cls, _prev_class(self.prev2), self.columns

    def probabilities(self, ctx) -> np.ndarray:
        w = self.weights[ctx[0]]
        t0, t1 = self.models[0].table(ctx[0]), self.models[1].table(ctx[1])
        t2 = self.models[2].table(None)  # the column model: context = column, in order
        return w[:, 0:1] * t0 + w[:, 1:2] * t1 + w[:, 2:3] * t2

    def update(self, ctx, sym: np.ndarray) -> None:
        sym = np.asarray(sym, dtype=np.int64)
        p0, p1, p2 = (m.prob(c, sym) for m, c in zip(self.models, ctx))  # before the counts change
        w = self.weights[ctx[0]]
        p = w[:, 0] * p0 + w[:, 1] * p1 + w[:, 2] * p2
        grad = np.stack([p0 / p - 1.0, p1 / p - 1.0, p2 / p - 1.0], axis=1)
        np.add.at(self.weights, ctx[0], np.float32(MIX_LR) * grad)
        touched = np.flatnonzero(np.bincount(ctx[0], minlength=self.weights.shape[0]))
        ww = np.maximum(self.weights[touched], MIX_FLOOR)
        norm = ww[:, 0] + ww[:, 1] + ww[:, 2]
        self.weights[touched] = ww / norm[:, None]
        self.models[0].update(ctx[0], sym)
        self.models[1].update(ctx[1], sym)
        self.models[2].update(None, sym)
        v = sym + self.lo - self.centre
        self.prev2 = self.prev
        self.prev = v
        self.col_abs += np.abs(v)
        self.rows_seen += 1


def _perm_bits(rows: int) -> int:
    return max(1, math.ceil(math.log2(rows))) if rows > 1 else 1


def _sigma(u: np.ndarray, alphabet: int) -> float:
    v = u.astype(np.float64) - alphabet // 2
    return float(np.float16(np.sqrt(np.mean(v * v))))


def _encode_rows(u: np.ndarray, lo: int, hi: int, centre: int, sigma: float) -> np.ndarray:
    if lo == hi:  # one symbol: nothing to code
        return np.zeros(0, dtype="<u4")
    c = _constriction()
    family = c.stream.model.Categorical(perfect=False)
    enc = c.stream.queue.RangeEncoder()
    model = _Model(lo, hi, centre, u.shape[1], sigma)
    for row in u:
        sym = row.astype(np.int32) - lo
        ctx = model.contexts()
        enc.encode(sym, family, model.probabilities(ctx))
        model.update(ctx, sym)
    return enc.get_compressed().astype("<u4")


def encode_ctx(u: np.ndarray, bits: int, *, order: np.ndarray | None = None, try_order: bool = True) -> bytes:
    """Code the offset integers ``u`` [R, C] (< 2^bits). ``order``: a row order to use (else the
    greedy L1 order is tried when ``try_order`` and kept only if smaller)."""
    u = np.ascontiguousarray(u, dtype=np.uint8)
    assert u.ndim == 2 and u.size > 0 and 1 <= bits <= 8
    alphabet = 1 << bits
    sigma = _sigma(u, alphabet)
    rows = u.shape[0]
    lo, hi = int(u.min()), int(u.max())

    def stream(perm: np.ndarray | None) -> bytes:
        perm = None if lo == hi else perm  # one symbol: no payload, no order
        data = u if perm is None else u[perm]
        words = _encode_rows(data, lo, hi, alphabet // 2, sigma)
        head = struct.pack("<BeBB", (CTX_VERSION << 1) | (1 if perm is not None else 0), sigma, lo, hi)
        if perm is not None:
            head += pack_bits_wide(perm, _perm_bits(rows))
        return head + struct.pack("<I", words.size) + words.tobytes()

    if order is not None:
        return stream(np.asarray(order, dtype=np.int64))
    best = stream(None)
    if try_order and rows > 2:
        reordered = stream(greedy_l2_order(u))
        if len(reordered) < len(best):
            best = reordered
    return best


def greedy_l2_order(u: np.ndarray, dims: int = 128) -> np.ndarray:
    """Greedy nearest-neighbour row order (start at row 0, then the unused row closest to the last
    appended one; ties: the lowest index) in squared L2 distance between the rows' projections
    on their top ``dims`` principal directions (all columns when there are fewer). One small
    matrix-vector product per row (|a - b|^2 = |a|^2 - 2 a.b + |b|^2), single-threaded (torch's
    and OpenBLAS's thread pools stall these small calls on a busy machine): a 8192 x 512 matrix
    orders in seconds, where R7's exact L1 rule takes minutes. The order is stored in the stream;
    the decoder never recomputes it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.from_numpy(np.ascontiguousarray(u, dtype=np.float64))
        x = x - x.mean(dim=0, keepdim=True)
        if x.shape[1] > dims:
            _, vecs = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
            x = x @ vecs[:, -dims:]
        x = x.float().contiguous()
        rows = x.shape[0]
        sq = (x * x).sum(dim=1)
        order = greedy_chain(rows, lambda last: torch.addmv(sq, x, x[last], alpha=-2.0))
    finally:
        torch.set_num_threads(threads)
    return order


def greedy_chain(rows: int, distances_from) -> np.ndarray:
    """Greedy nearest-neighbour order of ``rows`` items: start at 0, then repeatedly the unused item
    with the smallest ``distances_from(last)`` (a tensor over all items; ties: the lowest index)."""
    import torch

    dead = torch.zeros(rows, dtype=torch.bool)
    inf = torch.tensor(float("inf"))
    order = np.empty(rows, dtype=np.int64)
    last = 0
    for i in range(rows):
        order[i] = last
        dead[last] = True
        if i + 1 == rows:
            break
        last = int(torch.argmin(torch.where(dead, inf, distances_from(last))))
    return order


def pack_bits_wide(values: np.ndarray, bits: int) -> bytes:
    """Unsigned values of up to 24 bits, bit-packed LSB first (as ``bitpack.pack_bits`` for 1-8)."""
    v = np.asarray(values, dtype=np.uint32)
    bitmat = ((v[:, None] >> np.arange(bits, dtype=np.uint32)[None, :]) & 1).astype(np.uint8)
    return np.packbits(bitmat.reshape(-1), bitorder="little").tobytes()


def unpack_bits_wide(data: bytes, n: int, bits: int) -> np.ndarray:
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: n * bits].reshape(n, bits)
    return (flat.astype(np.uint32) << np.arange(bits, dtype=np.uint32)[None, :]).sum(axis=1).astype(np.int64)


def decode_ctx(data: bytes, rows: int, cols: int, bits: int) -> np.ndarray:
    """Inverse of ``encode_ctx``: the [rows, cols] uint8 offset integers; ValueError if malformed."""
    if rows <= 0 or cols <= 0:
        raise ValueError("ctx stream: empty tensor")
    if len(data) < 5:
        raise ValueError("ctx stream: truncated")
    flags, sigma, lo, hi = struct.unpack_from("<BeBB", data, 0)
    if flags >> 1 != CTX_VERSION:
        raise ValueError(f"ctx stream: model version {flags >> 1}, this pgolf decodes version {CTX_VERSION} (bad flags)")
    flags &= 1
    alphabet = 1 << bits
    if not (math.isfinite(sigma) and sigma >= 0) or lo > hi or hi >= alphabet:
        raise ValueError(f"ctx stream: bad header (sigma {sigma}, symbols {lo}..{hi} of {alphabet})")
    pos = 5
    perm = None
    if flags == 1:
        pb = _perm_bits(rows)
        nbytes = packed_nbytes(rows * pb, 1)
        if pos + nbytes > len(data):
            raise ValueError("ctx stream: truncated row permutation")
        perm = unpack_bits_wide(data[pos : pos + nbytes], rows, pb)
        pos += nbytes
        if not np.array_equal(np.sort(perm), np.arange(rows)):
            raise ValueError("ctx stream: the row order is not a permutation")
    if pos + 4 > len(data):
        raise ValueError("ctx stream: truncated word count")
    (nwords,) = struct.unpack_from("<I", data, pos)
    pos += 4
    if pos + 4 * nwords != len(data):
        raise ValueError(f"ctx stream: {len(data) - pos} payload bytes, the stream says {4 * nwords}")
    words = np.frombuffer(data, dtype="<u4", count=nwords, offset=pos).astype(np.uint32)
    if lo == hi:
        if nwords:
            raise ValueError("ctx stream: a one-symbol tensor carries no payload")
        out = np.full((rows, cols), lo, dtype=np.uint8)
        if perm is not None:
            raise ValueError("ctx stream: a one-symbol tensor has no row order")
        return out
    c = _constriction()
    family = c.stream.model.Categorical(perfect=False)
    dec = c.stream.queue.RangeDecoder(words)
    model = _Model(lo, hi, alphabet // 2, cols, sigma)
    out = np.empty((rows, cols), dtype=np.uint8)
    try:
        for r in range(rows):
            ctx = model.contexts()
            sym = np.asarray(dec.decode(family, model.probabilities(ctx)), dtype=np.int64)
            if sym.size != cols or (sym.size and (sym.min() < 0 or sym.max() > hi - lo)):
                raise ValueError("ctx stream: decoded symbols outside the alphabet")
            out[r] = sym + lo
            model.update(ctx, sym)
    except (AssertionError, RuntimeError, OverflowError) as exc:
        raise ValueError(f"ctx stream: corrupt range-coder payload ({str(exc)[:80]})") from None
    if perm is not None:
        restored = np.empty_like(out)
        restored[perm] = out
        out = restored
    return out
