"""Bit-packing of N-bit integers (N in 1..8), numpy-vectorised.

Values are stored as *offset binary*: ``u = q - qmin`` (so every grid, ``sym`` or ``full``, maps
onto 0..2^N-1), and the N low bits of each ``u`` are written one after another, least significant
bit first, into a little-endian bit stream (``np.packbits(bitorder="little")``). The last byte is
zero-padded; ``packed_nbytes(n, N) = ceil(n * N / 8)``. Offset binary rather than two's
complement because the decoder then needs no sign extension and the same code handles both grids.

Work is done in slices of ``_SLICE`` values so that the 8-bytes-per-value bit matrices stay small
(a 27M-parameter model never materialises 200 MB of bits at once).
"""

from __future__ import annotations

import numpy as np

_SLICE = 1 << 20  # values per slice; a multiple of 8 so every slice ends on a byte boundary


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_bits(u: np.ndarray, bits: int) -> bytes:
    """Pack unsigned values ``u`` (each < 2^bits) into ceil(len(u) * bits / 8) bytes."""
    assert 1 <= bits <= 8
    u = np.ascontiguousarray(u, dtype=np.uint8).reshape(-1)
    if u.size and int(u.max()) >> bits:
        raise ValueError(f"value {int(u.max())} does not fit in {bits} bits")
    if bits == 8:
        return u.tobytes()
    out = []
    for start in range(0, u.size, _SLICE):
        part = u[start : start + _SLICE]
        # [n, 8] bit matrix, LSB first; keep the low `bits` columns, flatten row-major.
        bitmat = np.unpackbits(part[:, None], axis=1, bitorder="little")[:, :bits]
        out.append(np.packbits(bitmat.reshape(-1), bitorder="little").tobytes())
    return b"".join(out)


def unpack_bits(data: bytes, n: int, bits: int) -> np.ndarray:
    """Inverse of ``pack_bits``: ``n`` unsigned values of ``bits`` bits each (uint8 array)."""
    assert 1 <= bits <= 8
    if len(data) != packed_nbytes(n, bits):
        raise ValueError(f"bit-packed stream has {len(data)} bytes, {n} values of {bits} bits need {packed_nbytes(n, bits)}")
    buf = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return buf.copy()
    out = np.empty(n, dtype=np.uint8)
    slice_bytes = _SLICE * bits // 8
    for i, start in enumerate(range(0, n, _SLICE)):
        count = min(_SLICE, n - start)
        chunk = buf[i * slice_bytes : i * slice_bytes + packed_nbytes(count, bits)]
        flat = np.unpackbits(chunk, bitorder="little")[: count * bits].reshape(count, bits)
        padded = np.zeros((count, 8), dtype=np.uint8)
        padded[:, :bits] = flat
        out[start : start + count] = np.packbits(padded, axis=1, bitorder="little")[:, 0]
    return out
