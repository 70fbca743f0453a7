"""Byte encodings of one tensor stream: raw little-endian arrays, bit-packed integers, and
range-coded integers. Used by the container; each ``unpack`` checks sizes and value ranges and
raises ``ValueError`` on anything malformed (the container adds the file and tensor names).

Packings:

* ``raw``: the array's bytes in its encoding (``ENCODINGS``); integer-format values are int8, one
  per byte, as the submissions stored them.
* ``bitpack``: integer-format values as N-bit offset binary ``q - qmin`` (``bitpack.py``).
* ``entropy``: integer-format values range-coded with row/column-group statistics (``entropy.py``).
* ``ctx``: integer-format values range-coded with adaptive probabilities conditioned on the previous
  row (optionally in a stored nearest-neighbour row order) and the column's running spread
  (``ctxcoder.py``).

The per-row scales (``s``, float16) may instead be ``ftree``: their bit patterns range-coded with
an adaptive binary tree (``scalecoder.py``, decoded by the container). Float streams may be
``shuffle``: the same bytes as byte planes (every value's byte 0, then every byte 1, ...), which
the byte codecs compress better (sign and exponent bytes together, noisy mantissa bytes together).
"""

from __future__ import annotations

import numpy as np
import torch

from pgolf.quant.bitpack import pack_bits, packed_nbytes, unpack_bits
from pgolf.quant.entropy import decode_entropy, encode_entropy
from pgolf.quant.formats import Format

PACKINGS = ("raw", "bitpack", "entropy", "ctx")
FLOAT_PACKINGS = ("raw", "shuffle")  # float streams: their bytes, or byte planes (shuffle_planes)
CODED_PACKINGS = ("entropy", "ctx", "ftree")  # range-coded: stored without a byte codec

# Stream encodings: tag -> (torch dtype, numpy dtype of the little-endian bytes).
ENCODINGS = {
    "f32": (torch.float32, "<f4"),
    "f16": (torch.float16, "<f2"),
    "bf16": (torch.bfloat16, "<u2"),  # stored as its raw 16 bits
    "i8": (torch.int8, "i1"),
    "i16": (torch.int16, "<i2"),
    "i32": (torch.int32, "<i4"),
    "i64": (torch.int64, "<i8"),
    "u8": (torch.uint8, "u1"),
    "b1": (torch.bool, "?"),
}
TAG_OF = {v[0]: k for k, v in ENCODINGS.items()}
FLOAT_TAGS = ("f32", "f16", "bf16")


def encoding_of(t: torch.Tensor) -> str:
    tag = TAG_OF.get(t.dtype)
    if tag is None:
        raise ValueError(f"cannot store dtype {t.dtype}")
    return tag


def itemsize(tag: str) -> int:
    return np.dtype(ENCODINGS[tag][1]).itemsize


def shuffle_planes(data: bytes, itemsize: int) -> bytes:
    """The bytes of ``itemsize``-byte elements as byte planes: byte 0 of every element, then byte 1, ..."""
    assert len(data) % itemsize == 0
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, itemsize).T.tobytes()


def unshuffle_planes(data: bytes, itemsize: int) -> bytes:
    if len(data) % itemsize:
        raise ValueError(f"{len(data)} bytes are not whole {itemsize}-byte elements")
    return np.frombuffer(data, dtype=np.uint8).reshape(itemsize, -1).T.tobytes()


def tensor_to_bytes(t: torch.Tensor) -> tuple[str, bytes]:
    tag = encoding_of(t)
    t = t.detach().cpu().contiguous()
    if tag == "bf16":
        t = t.view(torch.int16)
    return tag, t.numpy().astype(ENCODINGS[tag][1], copy=False).tobytes()


def tensor_from_bytes(tag: str, data: bytes, numel: int) -> torch.Tensor:
    if tag not in ENCODINGS:
        raise ValueError(f"unknown encoding {tag!r}")
    if len(data) != numel * itemsize(tag):
        raise ValueError(f"holds {len(data)} bytes, {numel} values of {tag} need {numel * itemsize(tag)}")
    torch_dtype, np_dtype = ENCODINGS[tag]
    arr = np.frombuffer(data, dtype=np_dtype, count=numel).copy()
    if tag == "bf16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    if tag == "b1" and numel and arr.view(np.uint8).max() > 1:
        raise ValueError("boolean stream holds values other than 0 and 1")
    return torch.from_numpy(arr).to(torch_dtype)


def _offsets(q: torch.Tensor, fmt: Format) -> np.ndarray:
    u = q.detach().cpu().numpy().astype(np.int16) - fmt.qmin
    assert u.min(initial=0) >= 0 and u.max(initial=0) <= fmt.qmax - fmt.qmin, "integer values outside the format's grid"
    return u.astype(np.uint8)


def pack_ints(q: torch.Tensor, fmt: Format, packing: str) -> bytes:
    """q: int8 [R, C] on the format's grid -> stream bytes in ``packing``."""
    if packing == "raw":
        return tensor_to_bytes(q.to(torch.int8))[1]
    if packing == "bitpack":
        return pack_bits(_offsets(q, fmt), fmt.bits)
    if packing == "entropy":
        return encode_entropy(_offsets(q, fmt).reshape(q.shape[0], -1), fmt.bits)
    if packing == "ctx":
        from pgolf.quant.ctxcoder import encode_ctx

        return encode_ctx(_offsets(q, fmt).reshape(q.shape[0], -1), fmt.bits)
    raise ValueError(f"unknown packing {packing!r}")


def unpack_ints(data: bytes, packing: str, fmt: Format, rows: int, cols: int) -> torch.Tensor:
    """Stream bytes -> int8 [rows, cols], every value checked to lie on the format's grid."""
    n = rows * cols
    if packing == "raw":
        q = tensor_from_bytes("i8", data, n).numpy().astype(np.int16)
    elif packing == "bitpack":
        if len(data) != packed_nbytes(n, fmt.bits):
            raise ValueError(f"holds {len(data)} bytes, {n} values of {fmt.bits} bits need {packed_nbytes(n, fmt.bits)}")
        q = unpack_bits(data, n, fmt.bits).astype(np.int16) + fmt.qmin
    elif packing == "entropy":
        if n == 0:
            raise ValueError("an empty tensor cannot be entropy-coded")
        q = decode_entropy(data, rows, cols, fmt.bits).reshape(-1).astype(np.int16) + fmt.qmin
    elif packing == "ctx":
        if n == 0:
            raise ValueError("an empty tensor cannot be context-coded")
        from pgolf.quant.ctxcoder import decode_ctx

        q = decode_ctx(data, rows, cols, fmt.bits).reshape(-1).astype(np.int16) + fmt.qmin
    else:
        raise ValueError(f"unknown packing {packing!r}")
    if n and (int(q.min()) < fmt.qmin or int(q.max()) > fmt.qmax):
        raise ValueError(f"values outside the {fmt.spec()} grid [{fmt.qmin}, {fmt.qmax}]")
    return torch.from_numpy(q.astype(np.int8).reshape(rows, cols))
