"""Context-mixing range coder of quantised integers (packing ``ctx``).

The order-0 coder (``entropy.py``) is within 0.2% of the order-0 bound of its contexts; what the
records' compressors exploit beyond that is *neighbouring rows*: R7 reorders rows so that similar
ones are adjacent and stores matrices transposed, so that ZPAQ's context mixing sees the values of
the previous rows in the same column. This coder models that directly, with ZPAQ's kind of model
(binary decisions, adaptive bit probabilities, logistic mixing) and contexts made for matrices:

* **Row order.** The rows are coded in their stored order, or in R7's greedy nearest-neighbour
  order (start at row 0, repeatedly the unused row closest in L1 to the last one) when that is
  smaller; the encoder codes the latter only when it looks worth its cost (the order-1 entropy
  of the values given the previous row's class, + log2 R! bits, below the stored order's). The
  order is stored as ranks: entry i is the rank of its row among those not yet listed, coded
  uniformly in R - i values (log2 R! bits in all, the least a permutation costs without a model).
* **Binarisation.** A value u in lo..hi is coded as the D = ceil(log2(hi - lo + 1)) bits of
  u - lo, most significant first: one binary decision per node of that tree.
* **Contexts** of the value at (row r, column c), known to the decoder before row r (v: the value
  centred on the grid's middle; "previous": in the coding order):
  1. the previous row's v in column c, bucketed sign-symmetrically (|v| 0..14 exact, 15+:
     31 classes) x the column's spread class (3: its mean |v| so far below 0.8x, within, or
     above 1.25x the mean over columns; the middle class for the first 4 rows);
  2. the v two rows back (31 classes);
  3. the column itself;
  4. the column's slow running mean m (exponential, weight 1/64, clipped to +-20) x the previous
     v's offset from it (clipped to +-4);
  5. the same with a fast running mean (weight 1/8);
  6. none (one probability per tree node: the tensor's own distribution).
  Each context has a bit probability at every tree node (16-bit integers, initialised from a
  discretised logistic of the tensor's spread, a stored fp16 sigma) moved towards each coded bit
  by 1/(n + 1.5) of the distance, n its count of updates capped at ``limit`` (350).
* **Mixing.** The six probabilities are mixed in the logistic domain (stretch = ln(p/(1-p)) and
  squash its inverse, integer tables) with a weight vector per tree level, trained online on the
  coding cost; an adaptive probability map (APM: the mixed probability's bucket among 33 on the
  stretch axis, per (tree node, class of the previous v)) refines it, and the coded probability
  is 3/4 the mixer's and 1/4 the APM's.
* **Versions.** Version 4 is the model above; version 3 (the same contexts, with an update cap
  of 90, mixer weights starting at 1/2, a faster mixer and an even split with the APM; 0.37%
  larger on the pr1855 cpu run) is still decoded, so that artifacts written before stay readable.

Every step is integer arithmetic (int64 sums, products, shifts and table look-ups; ``np.add.at``
sums, exact in any order), and the range coder receives probabilities k/4096, exact in float32,
so encoder and decoder agree bit for bit on any machine. The values are coded a tree level at a
time, vectorised over the row (D range-coder calls and about 60 numpy operations a row); the
state learns after the whole row (each tree node belongs to one level, so a row's levels never
share a probability or a weight; a cell used h times in the row moves by h/(n + 1.5) towards the
mean of its bits, never past it).

Stream layout::

    u8 flags (bit 0: rows reordered; bits 1-7: the model version, 4), f16 sigma, u8 lo, u8 hi
    (the symbols' range), u32 W, then W little-endian u32 words: the range coder's message (the
    order's ranks when reordered, then the rows' decisions).

Nothing in the stream is executed. A stream of an unknown model version is refused (never decoded
wrongly); a malformed header, a payload of the wrong length, a decoded symbol outside lo..hi or
words left over after the last row are errors (the container's CRC32 catches the corruptions of
the payload that decode to valid symbols).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

EDGES = np.arange(1, 16, dtype=np.int64)  # |v| bucket edges: 0, 1, ..., 14, 15+ (v = q, centred)
N_PREV = 2 * len(EDGES) + 1  # 31 sign-symmetric classes
N_COL = 3
CTX_VERSION = 4  # the model the encoder writes; the decoder also reads the versions in _PARAMS
PRIOR_WEIGHT = 256
EMA_SHIFTS = (6, 3)  # running column means: weights 1/64 and 1/8
EMA_CLIP, OFF_CLIP = 20, 4
W_BITS = 16  # mixer weights: fixed point with 16 fractional bits, |w| <= W_MAX
W_MAX = 4 << W_BITS
N_BITS = 12  # a probability cell: the 16-bit probability << N_BITS | its update count (< 2^N_BITS)


@dataclass(frozen=True)
class _Params:
    """The learning rates of a model version (the contexts are the same in all of them)."""

    limit: int  # a bit probability's update count cap: later updates move it by 1/(limit + 1.5) of the way
    w_rate: int  # mixer learning rate (the row's summed gradient x w_rate / columns)
    w_init: int  # every context's initial mixer weight, in 1/16
    apm_weight: int  # the APM's share of the coded probability, in 1/4 (the mixer's: the rest)


# Version 4 (measured on the pr1855 cpu run's tok_emb and eleven mlp.fc, 1.77M values: 3,108 bytes
# or 0.37% below version 3): weights starting at 3/16 (their sum ~1, not 3, so that the first rows
# are not coded over-confidently; most of the gain on the small tensors), probabilities that keep
# averaging for 350 updates (quantised weights are stationary), a slower mixer, a smaller APM share.
_PARAMS = {3: _Params(limit=90, w_rate=24, w_init=8, apm_weight=2), 4: _Params(limit=350, w_rate=18, w_init=3, apm_weight=1)}
_COL_WARMUP = 4
# squash(d) = 4096 / (1 + exp(-d / 256)) at d = -2048, -1920, ..., 2048; interpolated in between
_SQUASH_KNOTS = (1, 2, 4, 6, 10, 17, 27, 45, 74, 120, 194, 311, 488, 747, 1102, 1546, 2048, 2550, 2994, 3349, 3608, 3785,
                 3902, 3976, 4022, 4051, 4069, 4079, 4086, 4090, 4092, 4094, 4095)


def _tables() -> tuple[np.ndarray, np.ndarray]:
    knots = np.array(_SQUASH_KNOTS, dtype=np.int64)
    d = np.arange(1, 4096, dtype=np.int64)  # d + 2048 for d = -2047..2047
    i, f = d >> 7, d & 127
    squash = (knots[i] * (128 - f) + knots[np.minimum(i + 1, 32)] * f + 64) >> 7  # index d + 2047
    stretch = np.clip(np.searchsorted(squash, np.arange(4096), side="left") - 2047, -2047, 2047)  # its inverse, p 0..4095
    return squash, stretch.astype(np.int64)


SQUASH, STRETCH = _tables()
STRETCH16 = STRETCH[np.arange(1 << 16) >> 4]  # of a 16-bit probability
PAIRS = np.stack([4096 - np.arange(4096), np.arange(4096)], axis=1).astype(np.float32) / 4096  # [P(0), P(1)], exact


def _constriction():
    from pgolf.quant.entropy import _constriction as c

    return c()


def _prior_counts(alphabet: int, sigma: float) -> np.ndarray:
    """Integer prior counts of the symbols (v = u - alphabet // 2): a discretised logistic of the
    standard deviation ``sigma`` (an fp16: 256 sigma is exact and rounds alike everywhere), in integers:
    PRIOR_WEIGHT x (squash((v + 1/2) / b) - squash((v - 1/2) / b)) + 1, b = sigma sqrt(3) / pi."""
    s256 = max(int(round(float(sigma) * 256)), 128)
    edges = (2 * np.arange(-(alphabet // 2), alphabet - alphabet // 2 + 1, dtype=np.int64) - 1) * (232 * 256) // s256
    cdf = SQUASH[np.clip(edges, -2047, 2047) + 2047]
    return np.diff(cdf) * PRIOR_WEIGHT // 4096 + 1


def _prev_class(prev: np.ndarray) -> np.ndarray:
    mag = np.searchsorted(EDGES, np.abs(prev), side="right")
    return np.sign(prev) * mag + len(EDGES)


class _Model:
    """The adaptive state shared, step for step, by encoder and decoder (see the module docstring)."""

    def __init__(self, lo: int, hi: int, centre: int, cols: int, sigma: float, params: _Params):
        self.lo, self.centre, self.cols, self.params = lo, centre, cols, params
        a = hi - lo + 1
        self.depth = d = max(1, math.ceil(math.log2(a)))
        self.nodes = nn = 1 << d
        sizes = [N_PREV * N_COL, N_PREV, cols, (2 * EMA_CLIP + 1) * (2 * OFF_CLIP + 1), (2 * EMA_CLIP + 1) * (2 * OFF_CLIP + 1), 1]
        self.base = np.concatenate([[0], np.cumsum(sizes[:-1])]).astype(np.int64) * nn
        # every context starts from the prior's bit probabilities at each node (sums of the prior's
        # integer counts over the node's two halves)
        prior = np.zeros(nn, dtype=np.int64)
        prior[:a] = _prior_counts(2 * centre, sigma)[lo : hi + 1]
        cum = np.concatenate([[0], np.cumsum(prior)])
        node_p = np.full(nn, 2048, dtype=np.int64)
        for k in range(d):
            w = nn >> k
            starts = np.arange(1 << k, dtype=np.int64) * w
            total, ones = cum[starts + w] - cum[starts], cum[starts + w] - cum[starts + w // 2]
            node_p[(1 << k) + np.arange(1 << k)] = np.where(total > 0, ones * 4096 // np.maximum(total, 1), 2048)
        # one table of 16-bit probabilities: the contexts' node probabilities, then the APM's cells
        states = np.tile(np.clip(node_p, 1, 4095) << 4, sum(sizes))
        self.apm0 = states.size
        apm = np.tile(SQUASH[np.clip(np.arange(33) * 128 - 2048, -2047, 2047) + 2047] << 4, N_PREV * nn)
        self.pn = np.concatenate([states, apm]) << N_BITS  # probability << N_BITS | its update count
        self.scratch = np.zeros_like(self.pn)
        self.w = np.full((d, len(sizes)), (params.w_init << W_BITS) // 16, dtype=np.int64)
        zr = len(sizes) * 2047 * W_MAX >> W_BITS
        z = np.clip(np.arange(-zr, zr + 1), -2047, 2047)  # any mixer output, saturated
        self.squash, self.bucket, self.zr = SQUASH[z + 2047], (z + 2047 + 64) >> 7, zr
        self.prev = np.zeros(cols, dtype=np.int64)
        self.prev2 = np.zeros(cols, dtype=np.int64)
        self.ema = [np.zeros(cols, dtype=np.int64) for _ in EMA_SHIFTS]  # running means, 8 fractional bits
        self.col_abs = np.zeros(cols, dtype=np.int64)
        self.rows_seen = 0
        self.row_ctx = np.zeros((cols, len(sizes)), dtype=np.int64)
        self.row_ctx[:, 2] = np.arange(cols)
        m = len(sizes)
        self.buf_idx = np.zeros((d, cols, m + 1), dtype=np.int64)  # the cells used: m contexts + the APM's
        self.buf_st = np.zeros((d, cols, m), dtype=np.int64)
        self.buf_p = np.zeros((d, cols), dtype=np.int64)

    def start_row(self) -> None:
        pc = _prev_class(self.prev)
        ctx = self.row_ctx
        if self.rows_seen >= _COL_WARMUP:
            # column mean |v| vs the mean over columns, compared in integers: col * n_cols vs total
            scaled = self.col_abs * self.cols
            total = int(self.col_abs.sum())
            ctx[:, 0] = pc * N_COL + (5 * scaled >= 4 * total) + (4 * scaled > 5 * total)
        else:
            ctx[:, 0] = pc * N_COL + 1
        ctx[:, 1] = _prev_class(self.prev2)
        for i, acc in enumerate(self.ema):
            m = np.minimum(np.maximum((acc + 128) >> 8, -EMA_CLIP), EMA_CLIP)
            off = np.minimum(np.maximum(self.prev - m, -OFF_CLIP), OFF_CLIP)
            ctx[:, 3 + i] = (m + EMA_CLIP) * (2 * OFF_CLIP + 1) + off + OFF_CLIP
        self.row_base = self.base + ctx * self.nodes  # [cols, 6] (the last context: always 0)
        self.apm_row = pc * (self.nodes * 33) + self.apm0

    def prob(self, k: int, node: np.ndarray) -> np.ndarray:
        """The probabilities (12-bit integers, 1..4095) that the level-k bits of the row are 1."""
        idx = self.row_base + node[:, None]
        st = STRETCH16[self.pn[idx] >> N_BITS]
        z = ((st @ self.w[k]) >> W_BITS) + self.zr
        pm = self.squash[z]
        j = self.apm_row + node * 33 + self.bucket[z]  # APM: the nearest of 33 buckets of stretch(p)
        self.buf_idx[k, :, :-1], self.buf_idx[k, :, -1], self.buf_st[k], self.buf_p[k] = idx, j, st, pm
        a = self.params.apm_weight
        return (pm * (4 - a) + (self.pn[j] >> (N_BITS + 4)) * a + 2) >> 2

    def commit(self, bits: np.ndarray, u: np.ndarray) -> None:
        """Learn the row: ``bits`` [depth, cols] its tree decisions, ``u`` its symbols (u - lo)."""
        err = (bits << 12) - self.buf_p  # [depth, cols]
        grad = np.matmul(err[:, None, :], self.buf_st)[:, 0]  # [depth, contexts]
        self.w = np.minimum(np.maximum(self.w + grad * self.params.w_rate // (self.cols << 10), -W_MAX), W_MAX)
        # every probability used moves towards its bits: a cell used h times in the row, o of them
        # ones, becomes p + (o 2^16 - h p) / (max(n, h) + 1.5), n its update count capped at limit
        # (never past o/h: p stays in 0..65535); the hits and ones are summed in one scratch cell
        idx = self.buf_idx.reshape(-1)
        np.add.at(self.scratch, idx, np.repeat(bits.reshape(-1) + (1 << 32), self.buf_idx.shape[2]))
        ho, pn = self.scratch[idx], self.pn[idx]
        self.scratch[idx] = 0
        h, p = ho >> 32, pn >> N_BITS
        n = np.minimum((pn & ((1 << N_BITS) - 1)) + h, self.params.limit)
        step = (((ho & 0xFFFFFFFF) << 16) - h * p) * 131072 // (2 * np.maximum(n, h) + 3)  # x 65536 / (n + 1.5)
        self.pn[idx] = ((p + (step >> 16)) << N_BITS) | n
        v = u + self.lo - self.centre
        self.prev2, self.prev = self.prev, v
        for i, s in enumerate(EMA_SHIFTS):
            self.ema[i] = self.ema[i] + (((v << 8) - self.ema[i]) >> s)
        self.col_abs += np.abs(v)
        self.rows_seen += 1


def _sigma(u: np.ndarray, alphabet: int) -> float:
    v = u.astype(np.float64) - alphabet // 2
    return float(np.float16(np.sqrt(np.mean(v * v))))


def _order_ranks(perm: np.ndarray) -> np.ndarray:
    """Rank of each perm[i] among the indices not in perm[:i] (a Fenwick tree of the unused)."""
    n = perm.size
    tree = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):  # all unused: tree[i] = lowbit(i)
        tree[i] = i & -i
    tree = tree.tolist()
    ranks = np.empty(n, dtype=np.int64)
    for i, x in enumerate(perm.tolist()):
        r, j = 0, x
        while j > 0:  # unused indices below x
            r += tree[j]
            j -= j & -j
        ranks[i] = r
        _fenwick_remove(tree, x, n)
    return ranks


def _order_from_ranks(ranks: np.ndarray) -> np.ndarray:
    """Inverse of ``_order_ranks``: the index of each rank among the still unused indices."""
    n = ranks.size
    tree = [0] + [i & -i for i in range(1, n + 1)]
    top = 1 << max(0, n.bit_length() - 1) if n else 0
    perm = np.empty(n, dtype=np.int64)
    for i, r in enumerate(ranks.tolist()):
        pos, step = 0, top
        while step:  # the largest pos whose unused count is <= r
            if pos + step <= n and tree[pos + step] <= r:
                pos += step
                r -= tree[pos]
            step >>= 1
        perm[i] = pos
        _fenwick_remove(tree, pos, n)
    return perm


def _fenwick_remove(tree: list[int], index: int, n: int) -> None:
    """Mark ``index`` used: one less unused index at and above it in the Fenwick tree."""
    j = index + 1
    while j <= n:
        tree[j] -= 1
        j += j & -j


def _bits_of(t: np.ndarray, depth: int) -> np.ndarray:
    return (t[None, :] >> np.arange(depth - 1, -1, -1, dtype=np.int64)[:, None]) & 1


def _encode(u: np.ndarray, lo: int, hi: int, centre: int, sigma: float, perm: np.ndarray | None) -> np.ndarray:
    c = _constriction()
    enc = c.stream.queue.RangeEncoder()
    rows = u.shape[0]
    if perm is not None and rows > 1:
        enc.encode(_order_ranks(perm)[:-1].astype(np.int32), c.stream.model.Uniform(), np.arange(rows, 1, -1, dtype=np.int32))
    data = u if perm is None else u[perm]
    family = c.stream.model.Categorical(perfect=False)
    model = _Model(lo, hi, centre, u.shape[1], sigma, _PARAMS[CTX_VERSION])
    for row in data:
        t = row.astype(np.int64) - lo
        bits = _bits_of(t, model.depth)
        model.start_row()
        node = np.ones_like(t)
        for k in range(model.depth):
            enc.encode(bits[k].astype(np.int32), family, PAIRS[model.prob(k, node)])
            node = (node << 1) | bits[k]
        model.commit(bits, t)
    return enc.get_compressed().astype("<u4")


def encode_ctx(u: np.ndarray, bits: int, *, order: np.ndarray | None = None, try_order: bool = True) -> bytes:
    """Code the offset integers ``u`` [R, C] (< 2^bits). ``order``: a row order to use (else the
    greedy nearest-neighbour order is tried when ``try_order`` and kept only if smaller)."""
    u = np.ascontiguousarray(u, dtype=np.uint8)
    assert u.ndim == 2 and u.size > 0 and 1 <= bits <= 8
    alphabet = 1 << bits
    sigma = _sigma(u, alphabet)
    rows = u.shape[0]
    lo, hi = int(u.min()), int(u.max())

    def stream(perm: np.ndarray | None) -> bytes:
        perm = None if lo == hi else perm  # one symbol: no payload, no order
        words = np.zeros(0, dtype="<u4") if lo == hi else _encode(u, lo, hi, alphabet // 2, sigma, perm)
        head = struct.pack("<BeBB", (CTX_VERSION << 1) | (1 if perm is not None else 0), sigma, lo, hi)
        return head + struct.pack("<I", words.size) + words.tobytes()

    if order is not None:
        return stream(np.asarray(order, dtype=np.int64))
    best = stream(None)
    if try_order and rows > 2 and lo < hi:
        perm = greedy_l1_order(u)
        # the reordered stream is coded only when it looks worth its order: the static entropy of
        # the values given the previous row's class, + log2 R! bits, below that of the stored order
        if _neighbour_bits(u[perm], alphabet) + math.lgamma(rows + 1) / math.log(2) < _neighbour_bits(u, alphabet):
            reordered = stream(perm)
            if len(reordered) < len(best):
                best = reordered
    return best


def _neighbour_bits(u: np.ndarray, alphabet: int) -> float:
    """Order-1 entropy (bits) of the rows after the first given the previous row's value class."""
    classes = _prev_class(u[:-1].astype(np.int64) - alphabet // 2)
    counts = np.bincount((classes * alphabet + u[1:]).reshape(-1), minlength=N_PREV * alphabet).reshape(N_PREV, alphabet)
    totals = counts.sum(axis=1, keepdims=True)
    nz = counts > 0
    return float(-(counts[nz] * np.log2((counts / np.maximum(totals, 1))[nz])).sum())


def greedy_l1_order(u: np.ndarray) -> np.ndarray:
    """R7's greedy nearest-neighbour row order: start at row 0, then repeatedly the unused row with
    the smallest L1 distance to the last appended one (ties: the lowest index). Integer rows (int16,
    exact sums), single-threaded (torch's thread pool stalls these small calls on a busy machine),
    and the used rows dropped from the search as they accumulate: an 8192 x 128 matrix orders in
    seconds. The order is stored in the stream; the decoder never recomputes it."""
    import torch

    rows = u.shape[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.from_numpy(np.ascontiguousarray(u, dtype=np.int16))
        ids, live = torch.arange(rows), x  # the rows searched, in index order (argmin: the lowest on ties)
        used = torch.zeros(rows, dtype=torch.bool)
        order = np.zeros(rows, dtype=np.int64)
        for i in range(1, rows):
            used[order[i - 1]] = True
            if 2 * (i - rows + ids.numel()) > ids.numel() > 64:  # over half of them used: drop those
                keep = ~used[ids]
                ids, live = ids[keep], live[keep]
            d = torch.sub(live, x[order[i - 1]]).abs_().sum(dim=1, dtype=torch.int32)
            order[i] = int(ids[int(torch.argmin(d.masked_fill_(used[ids], torch.iinfo(torch.int32).max)))])
    finally:
        torch.set_num_threads(threads)
    return order


def decode_ctx(data: bytes, rows: int, cols: int, bits: int) -> np.ndarray:
    """Inverse of ``encode_ctx``: the [rows, cols] uint8 offset integers; ValueError if malformed."""
    if rows <= 0 or cols <= 0:
        raise ValueError("ctx stream: empty tensor")
    if len(data) < 9:
        raise ValueError("ctx stream: truncated")
    flags, sigma, lo, hi = struct.unpack_from("<BeBB", data, 0)
    if flags >> 1 not in _PARAMS:
        known = ", ".join(str(v) for v in _PARAMS)
        raise ValueError(f"ctx stream: model version {flags >> 1}, this pgolf decodes versions {known} (bad flags)")
    reordered = bool(flags & 1)
    alphabet = 1 << bits
    if not (math.isfinite(sigma) and sigma >= 0) or lo > hi or hi >= alphabet:
        raise ValueError(f"ctx stream: bad header (sigma {sigma}, symbols {lo}..{hi} of {alphabet})")
    (nwords,) = struct.unpack_from("<I", data, 5)
    if 9 + 4 * nwords != len(data):
        raise ValueError(f"ctx stream: {len(data) - 9} payload bytes, the stream says {4 * nwords}")
    words = np.frombuffer(data, dtype="<u4", count=nwords, offset=9).astype(np.uint32)
    if lo == hi:
        if nwords or reordered:
            raise ValueError("ctx stream: a one-symbol tensor carries no payload and no row order")
        return np.full((rows, cols), lo, dtype=np.uint8)
    c = _constriction()
    dec = c.stream.queue.RangeDecoder(words)
    family = c.stream.model.Categorical(perfect=False)
    model = _Model(lo, hi, alphabet // 2, cols, sigma, _PARAMS[flags >> 1])
    out = np.empty((rows, cols), dtype=np.uint8)
    bits_buf = np.empty((model.depth, cols), dtype=np.int64)
    try:
        perm = None
        if reordered:
            ranks = np.zeros(rows, dtype=np.int64)
            if rows > 1:
                ranks[:-1] = dec.decode(c.stream.model.Uniform(), np.arange(rows, 1, -1, dtype=np.int32))
            if np.any(ranks >= np.arange(rows, 0, -1)):
                raise ValueError("ctx stream: a row-order rank out of range")
            perm = _order_from_ranks(ranks)
        for r in range(rows):
            model.start_row()
            node = np.ones(cols, dtype=np.int64)
            for k in range(model.depth):
                bits_buf[k] = dec.decode(family, PAIRS[model.prob(k, node)])
                node = (node << 1) | bits_buf[k]
            t = node - model.nodes
            if t.max() > hi - lo:
                raise ValueError("ctx stream: decoded symbols outside the alphabet")
            out[r] = t + lo
            model.commit(bits_buf, t)
        if not dec.maybe_exhausted():
            raise ValueError("ctx stream: range-coder words left over after the last row (corrupt payload)")
    except (AssertionError, RuntimeError, OverflowError) as exc:
        raise ValueError(f"ctx stream: corrupt range-coder payload ({str(exc)[:80]})") from None
    if perm is not None:
        restored = np.empty_like(out)
        restored[perm] = out
        out = restored
    return out
