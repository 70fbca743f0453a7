"""The same quantised integers under the records' compressors, next to pgolf's own coder.

Schemes (whole model: integers, scales, float tensors, LQER factors and a manifest of names and
shapes, so every number is a complete file of that scheme):

* ``zstd-22``: one blob (manifest + every stream's raw bytes, integers one per byte), zstd level 22;
* ``brotli-11-shuffle``: the same blob byte-shuffled as R3-R6 did ("BSHF", stride 2: the bytes
  at even offsets, then the odd ones) and brotli quality 11 (default window);
* ``lrzip-pergroup``: R7's per-group scheme (``pgolf.quant.pergroup``), None when the ``lrzip``
  binary is missing;
* ``pgolf``: the artifact file itself;
* ``entropy_bound``: the order-0 entropy (one distribution per tensor) of every integer tensor's
  values, plus pgolf's own bytes for everything else (scales, floats, factors, header): the
  bound that an order-0 coder of the integers cannot beat, and a context model can.

Per group (R7's seven groups, ``other ints``: integer tensors outside them, ``rest``: the remaining
streams) the integer values of the group are compressed alone by each scheme (the group blob, in
layer order, row-major; lrzip: R7's reordered, transposed group stream); pgolf's number is the
bytes of those tensors' value streams in the artifact (exact when a stream has its own chunk or
is range-coded, prorated inside a shared chunk). Group numbers are separate compressions, so
they do not add up to the whole-model numbers of the byte codecs.
"""

from __future__ import annotations

import json
import struct
import time

import numpy as np

from pgolf.errors import MissingDependencyError
from pgolf.quant.codecs import compress
from pgolf.quant.entropy import tensor_bound_bits
from pgolf.quant.export import QTensor
from pgolf.quant.formats import parse_format
from pgolf.quant.pergroup import GROUPS, encode_pergroup, group_of
from pgolf.quant.streams import tensor_to_bytes

SHUFFLE_MAGIC = b"BSHF"
CODEC_KEYS = ("pgolf", "zstd-22", "brotli-11-shuffle", "lrzip-pergroup", "entropy_bound")


def byte_shuffle(data: bytes, stride: int = 2) -> bytes:
    """R3-R6's byte shuffle: magic, the stride, then for each residue r < stride the bytes at
    offsets = r (mod stride)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    return SHUFFLE_MAGIC + bytes([stride]) + b"".join(arr[r::stride].tobytes() for r in range(stride))


def byte_unshuffle(blob: bytes) -> bytes:
    if blob[:4] != SHUFFLE_MAGIC or len(blob) < 5 or blob[4] == 0:
        raise ValueError("not a byte-shuffled blob (bad magic or stride)")
    stride, body = blob[4], np.frombuffer(blob[5:], dtype=np.uint8)
    out = np.empty_like(body)
    pos = 0
    for r in range(stride):
        n = len(range(r, body.size, stride))
        out[r::stride] = body[pos : pos + n]
        pos += n
    return out.tobytes()


def brotli_shuffle(data: bytes) -> bytes:
    from pgolf.quant.codecs import _brotli

    return _brotli().compress(byte_shuffle(data), quality=11)


def records_blob(qtensors: list[QTensor]) -> bytes:
    """Manifest (names, shapes, formats, stream sizes) + every stream's raw bytes: the content of
    the records' torch.save blob without the pickle."""
    manifest, parts = [], []
    for qt in qtensors:
        streams = [qt.values] + ([qt.scale] if qt.scale is not None else [])
        if qt.lqer is not None:
            streams += [qt.lqer.qa, qt.lqer.sa, qt.lqer.qb, qt.lqer.sb]
        sizes = []
        for t in streams:
            tag, data = tensor_to_bytes(t)
            parts.append(data)
            sizes.append([tag, len(data)])
        manifest.append([qt.name, list(qt.shape), qt.dtype, qt.fmt, sizes, qt.lqer.descriptor() if qt.lqer is not None else None])
    head = json.dumps(manifest, separators=(",", ":")).encode()
    return struct.pack("<I", len(head)) + head + b"".join(parts)


def int_bound_bytes(qt: QTensor) -> float:
    fmt = parse_format(qt.fmt)
    u = (qt.values.numpy().astype(np.int16) - fmt.qmin).astype(np.uint8)
    return tensor_bound_bits(u, fmt.bits) / 8


def codec_comparison(qtensors: list[QTensor], pgolf_bytes: int, pgolf_value_bytes: dict[str, float], *, lrzip: bool = True,
                     brotli: bool = True, timings: bool = False) -> dict:
    """The codecs table of one model (see the module docstring). ``pgolf_value_bytes``: the
    stored bytes of each integer tensor's value stream in pgolf's artifact. ``timings``: also
    decode each whole-model blob and report ``codec_decode_seconds`` (checked to round-trip)."""
    ints = [qt for qt in qtensors if qt.scale is not None]
    members: dict[str, list[QTensor]] = {g: [] for g in GROUPS + ("other ints",)}
    for qt in ints:
        members[group_of(qt.name) if len(qt.shape) == 2 and group_of(qt.name) else "other ints"].append(qt)
    seconds: dict[str, float] = {}
    decode_seconds: dict[str, float] = {}
    blob = records_blob(qtensors)
    t0 = time.perf_counter()
    z = compress("zstd-22", blob)
    totals = {"pgolf": pgolf_bytes, "zstd-22": len(z)}
    seconds["zstd-22"] = time.perf_counter() - t0
    if timings:
        from pgolf.quant.codecs import decompress

        t0 = time.perf_counter()
        assert decompress("zstd-22", z, len(blob)) == blob
        decode_seconds["zstd-22"] = time.perf_counter() - t0
    if brotli:
        t0 = time.perf_counter()
        b = brotli_shuffle(blob)
        totals["brotli-11-shuffle"] = len(b)
        seconds["brotli-11-shuffle"] = time.perf_counter() - t0
        if timings:
            from pgolf.quant.codecs import _brotli

            t0 = time.perf_counter()
            assert byte_unshuffle(_brotli().decompress(b)) == blob
            decode_seconds["brotli-11-shuffle"] = time.perf_counter() - t0
    else:
        totals["brotli-11-shuffle"] = None
    pg, note = None, None
    if lrzip:
        try:
            t0 = time.perf_counter()
            pg = encode_pergroup(qtensors)
            seconds["lrzip-pergroup"] = time.perf_counter() - t0
            if timings:
                from pgolf.quant.pergroup import decode_pergroup

                t0 = time.perf_counter()
                _, back = decode_pergroup(pg.blob)
                decode_seconds["lrzip-pergroup"] = time.perf_counter() - t0
                assert all(x.name == y.name and bool((x.values == y.values).all()) for x, y in zip(qtensors, back))
        except MissingDependencyError as exc:
            note = str(exc)
    else:
        note = "lrzip-pergroup not computed (skipped on request)"
    totals["lrzip-pergroup"] = len(pg.blob) if pg is not None else None
    bounds = {qt.name: int_bound_bytes(qt) for qt in ints}
    non_int = pgolf_bytes - sum(pgolf_value_bytes.get(qt.name, 0.0) for qt in ints)
    totals["entropy_bound"] = round(sum(bounds.values()) + non_int)
    rows = []
    for g, lst in members.items():
        if not lst:
            continue
        raw = b"".join(qt.values.numpy().tobytes() for qt in lst)
        row = {
            "group": g,
            "tensors": len(lst),
            "values": sum(qt.values.numel() for qt in lst),
            "pgolf": round(sum(pgolf_value_bytes.get(qt.name, 0.0) for qt in lst)),
            "zstd-22": len(compress("zstd-22", raw)),
            "brotli-11-shuffle": len(brotli_shuffle(raw)) if brotli else None,
            "lrzip-pergroup": pg.group_bytes[g] if pg is not None and g in pg.group_bytes else None,
            "entropy_bound": round(sum(bounds[qt.name] for qt in lst)),
        }
        rows.append(row)
    rest = {"group": "rest", "tensors": len(qtensors) - len(ints), "values": None,
            "pgolf": round(non_int), "zstd-22": None, "brotli-11-shuffle": None,
            "lrzip-pergroup": (pg.remainder_bytes + pg.perm_bytes + pg.overhead_bytes) if pg is not None else None,
            "entropy_bound": round(non_int)}
    rows.append(rest)
    out = {"codecs": {k: totals[k] for k in CODEC_KEYS}, "codec_groups": rows, "codec_seconds": seconds}
    if timings:
        out["codec_decode_seconds"] = decode_seconds
    if note:
        out["lrzip_note"] = note
    return out
