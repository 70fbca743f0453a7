"""The artifact container: a versioned, self-describing binary file that loads without pickle.

Layout (all integers little-endian)::

    magic      8 bytes   b"PGOLFAR\\x00"
    version    u16       CONTAINER_VERSION
    hdr_codec  u8        codec id of the header (see codecs.CODEC_IDS)
    hdr_len    u32       compressed header length
    hdr_raw    u32       decompressed header length
    header     hdr_len   compressed UTF-8 JSON: {"meta": {...}, "chunks": [...], "tensors": [...]}
    chunks     ...       each chunk: bytes compressed with its own codec, in header order
    crc32      u32       zlib.crc32 of every byte before it

Header JSON:

* ``chunks``: ``[{"codec": "zstd-22", "raw_len": n, "len": m}, ...]``;
* ``tensors``: ``[{"name", "shape", "dtype", "fmt", "streams": {"values": S, "scale": S}}]`` where a
  stream S is ``{"chunk": i, "offset": o, "nbytes": n, "enc": "i8"|"f16"|..., "packing": "raw"}``,
  ``offset`` and ``nbytes`` being positions inside the decompressed chunk.

Reading checks the magic, version, lengths and checksum before parsing anything, then every
stream's bounds and size against its shape. Any mismatch is an ``ArtifactError`` naming the file.
Nothing in the file is ever executed: the header is JSON and the tensors are raw arrays.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pgolf.errors import ArtifactError
from pgolf.quant.codecs import CODEC_IDS, compress, decompress
from pgolf.quant.export import TORCH_DTYPES, QTensor
from pgolf.quant.formats import parse_format

MAGIC = b"PGOLFAR\x00"
CONTAINER_VERSION = 1
_PREAMBLE = struct.Struct("<8sHBII")
_CRC = struct.Struct("<I")
_MAX_HEADER = 64 << 20

# Stream encodings: tag -> (torch dtype, numpy dtype used for the little-endian bytes).
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
_TAG_OF = {v[0]: k for k, v in ENCODINGS.items()}


def tensor_to_bytes(t: torch.Tensor) -> tuple[str, bytes]:
    tag = _TAG_OF.get(t.dtype)
    if tag is None:
        raise ArtifactError(f"cannot store dtype {t.dtype}")
    t = t.detach().cpu().contiguous()
    if tag == "bf16":
        t = t.view(torch.int16)
    return tag, t.numpy().astype(ENCODINGS[tag][1], copy=False).tobytes()


def tensor_from_bytes(tag: str, data: bytes, numel: int) -> torch.Tensor:
    torch_dtype, np_dtype = ENCODINGS[tag]
    arr = np.frombuffer(data, dtype=np_dtype, count=numel).copy()
    if tag == "bf16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr).to(torch_dtype)


@dataclass
class ChunkPlan:
    """Which codec compresses which tensors. Tensors not named go to ``default_codec``'s chunk."""

    default_codec: str = "zlib-9"
    tensor_codecs: dict[str, str] = field(default_factory=dict)


def encode_artifact(qtensors: list[QTensor], meta: dict, plan: ChunkPlan | None = None) -> bytes:
    plan = plan or ChunkPlan()
    chunk_order: list[str] = []  # one chunk per distinct codec, in first-use order
    chunk_raw: dict[str, bytearray] = {}
    entries = []
    for qt in qtensors:
        codec = plan.tensor_codecs.get(qt.name, plan.default_codec)
        if codec not in CODEC_IDS:
            raise ArtifactError(f"unknown codec {codec!r} for {qt.name}")
        if codec not in chunk_raw:
            chunk_order.append(codec)
            chunk_raw[codec] = bytearray()
        buf = chunk_raw[codec]
        streams = {}
        for key, tensor in (("values", qt.values), ("scale", qt.scale)):
            if tensor is None:
                continue
            tag, data = tensor_to_bytes(tensor)
            streams[key] = {"chunk": chunk_order.index(codec), "offset": len(buf), "nbytes": len(data), "enc": tag, "packing": "raw"}
            buf += data
        entries.append({"name": qt.name, "shape": list(qt.shape), "dtype": qt.dtype, "fmt": qt.fmt, "streams": streams})
    compressed = [compress(c, bytes(chunk_raw[c])) for c in chunk_order]
    chunks = [{"codec": c, "raw_len": len(chunk_raw[c]), "len": len(z)} for c, z in zip(chunk_order, compressed)]
    header_raw = json.dumps({"meta": meta, "chunks": chunks, "tensors": entries}, separators=(",", ":")).encode("utf-8")
    header = compress("zlib-9", header_raw)
    body = _PREAMBLE.pack(MAGIC, CONTAINER_VERSION, CODEC_IDS["zlib-9"], len(header), len(header_raw)) + header + b"".join(compressed)
    return body + _CRC.pack(zlib.crc32(body))


def decode_artifact(blob: bytes, source: str = "<bytes>") -> tuple[dict, list[QTensor]]:
    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"{source}: {why}")

    if len(blob) < _PREAMBLE.size + _CRC.size:
        raise bad(f"too short to be a pgolf artifact ({len(blob)} bytes)")
    magic, version, hdr_codec_id, hdr_len, hdr_raw_len = _PREAMBLE.unpack_from(blob, 0)
    if magic != MAGIC:
        hint = " (it looks like a pickle/torch.save file; pgolf never unpickles artifacts)" if blob[:1] in (b"\x80", b"PK") else ""
        raise bad(f"not a pgolf artifact (bad magic){hint}")
    if version != CONTAINER_VERSION:
        raise bad(f"unsupported artifact version {version} (this pgolf reads version {CONTAINER_VERSION}); upgrade pgolf")
    (crc,) = _CRC.unpack_from(blob, len(blob) - _CRC.size)
    body = blob[: -_CRC.size]
    if zlib.crc32(body) != crc:
        raise bad("checksum mismatch: the file is truncated or corrupted")
    codec_names = {v: k for k, v in CODEC_IDS.items()}
    if hdr_codec_id not in codec_names or hdr_raw_len > _MAX_HEADER:
        raise bad("malformed header")
    pos = _PREAMBLE.size
    if pos + hdr_len > len(body):
        raise bad("header runs past the end of the file")
    try:
        header = json.loads(decompress(codec_names[hdr_codec_id], body[pos : pos + hdr_len], hdr_raw_len))
        meta, chunk_specs, tensor_specs = header["meta"], header["chunks"], header["tensors"]
    except (ArtifactError, ValueError, KeyError, TypeError) as exc:
        raise bad(f"malformed header ({exc})") from None
    pos += hdr_len
    chunks: list[bytes] = []
    for spec in chunk_specs:
        try:
            codec, raw_len, length = spec["codec"], int(spec["raw_len"]), int(spec["len"])
        except (KeyError, TypeError, ValueError):
            raise bad("malformed chunk table") from None
        if codec not in CODEC_IDS:
            raise bad(f"unknown codec {codec!r}")
        if length < 0 or pos + length > len(body):
            raise bad("chunk runs past the end of the file")
        try:
            chunks.append(decompress(codec, body[pos : pos + length], raw_len))
        except ArtifactError as exc:
            raise bad(str(exc)) from None
        pos += length
    if pos != len(body):
        raise bad(f"{len(body) - pos} unexpected trailing bytes")
    qtensors = [_decode_tensor(spec, chunks, bad) for spec in tensor_specs]
    return meta, qtensors


def _decode_tensor(spec: dict, chunks: list[bytes], bad) -> QTensor:
    try:
        name, shape, dtype, fmt, streams = spec["name"], tuple(int(d) for d in spec["shape"]), spec["dtype"], spec["fmt"], spec["streams"]
    except (KeyError, TypeError, ValueError):
        raise bad("malformed tensor entry") from None
    if any(d < 0 for d in shape):
        raise bad(f"{name}: negative dimension in shape {shape}")
    if dtype not in TORCH_DTYPES:
        raise bad(f"{name}: unknown dtype {dtype!r}")
    if fmt != "raw":
        try:
            is_int = parse_format(fmt).kind == "int"
        except ValueError:
            raise bad(f"{name}: unknown format {fmt!r}") from None
        if is_int != ("scale" in streams):
            raise bad(f"{name}: format {fmt} {'needs' if is_int else 'has no'} a scale stream")
    numel = int(np.prod(shape)) if shape else 1
    rows = shape[0] if len(shape) >= 2 else 1
    tensors = {}
    for key, s in streams.items():
        try:
            chunk, offset, nbytes, enc, packing = int(s["chunk"]), int(s["offset"]), int(s["nbytes"]), s["enc"], s["packing"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"{name}: malformed stream {key!r}") from None
        if enc not in ENCODINGS or packing != "raw":
            raise bad(f"{name}: unknown encoding {enc!r}/{packing!r} for stream {key!r}")
        if not 0 <= chunk < len(chunks) or offset < 0 or offset + nbytes > len(chunks[chunk]):
            raise bad(f"{name}: stream {key!r} points outside its chunk")
        count = numel if key == "values" else rows
        itemsize = np.dtype(ENCODINGS[enc][1]).itemsize
        if nbytes != count * itemsize:
            raise bad(f"{name}: stream {key!r} holds {nbytes} bytes but shape {list(shape)} needs {count * itemsize}")
        tensors[key] = tensor_from_bytes(enc, chunks[chunk][offset : offset + nbytes], count)
    if "values" not in tensors:
        raise bad(f"{name}: no values stream")
    values = tensors["values"]
    scale = tensors.get("scale")
    if scale is not None:
        values = values.reshape(rows, -1)
    return QTensor(name, shape, dtype, fmt, values, scale)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_artifact(path: str | Path) -> tuple[dict, list[QTensor]]:
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read artifact ({exc.strerror})") from None
    return decode_artifact(blob, str(path))
