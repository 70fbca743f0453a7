"""The artifact container: a versioned, self-describing binary file that loads without pickle.

Layout (all integers little-endian)::

    magic      8 bytes   b"PGOLFAR\\x00"
    version    u16       CONTAINER_VERSION (3; version 2 files, which have no stacks, are read too)
    hdr_codec  u8        codec id of the header (codecs.CODEC_IDS)
    hdr_len    u32       compressed header length
    hdr_raw    u32       decompressed header length
    header     hdr_len   compressed UTF-8 JSON (below)
    chunks     ...       each chunk: bytes compressed with its own codec, in header order
    crc32      u32       zlib.crc32 of every byte before it

Header JSON (arrays rather than objects: the header counts toward the 16 MB)::

    {"meta": {...},
     "chunks": [[codec, raw_len, len], ...],
     "tensors": [[name, shape, dtype, fmt, [[key, chunk, offset, nbytes, enc, packing], ...]], ...]}

A ``v`` stream of an integer tensor in a *role stack* (``stacks.py``: the same matrix of every block
coded as one ``entropy`` or ``ctx`` stream) has two more items, ``first_row, stack_rows``: the
stream is the stack's, of ``stack_rows`` rows, and the tensor's rows start at ``first_row``.

``key`` is ``v`` (values) or ``s`` (per-row scales of an integer format); ``offset``/``nbytes``
locate the stream inside the *decompressed* chunk; ``enc`` is the element encoding
(``streams.ENCODINGS``) and ``packing`` is ``raw``, ``bitpack``, ``entropy`` or ``ctx`` (integer values
only; LQER factors ``la``/``lb``: ``bitpack`` or ``entropy``), or ``ftree`` for fp16 scales
(``scalecoder.py``). The packing and the chunk's codec are the export's recorded per-tensor choice.

Chunks: range-coded streams go, uncompressed, into one ``none`` chunk. With a fixed codec every
other stream shares one chunk compressed with it (as the submissions compressed one blob). With
``codec=auto`` every stream of at least ``SOLO_MIN_BYTES`` gets its own chunk with the smallest
codec for it, and the small rest (scales, control tensors) one chunk with the codec that
compresses their concatenation best.

Reading checks the magic (a pickle / torch.save / zstd'd torch.save file is named as such and
rejected before anything is parsed), the version, lengths and the checksum, then parses the JSON
header against its schema and checks every stream's bounds, size, packing and value range. Any
mismatch is an ``ArtifactError`` naming the file. Nothing in the file is ever executed.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pgolf.errors import ArtifactError
from pgolf.quant.codecs import CODEC_IDS, CODEC_NAMES, compress, decompress
from pgolf.quant.export import TORCH_DTYPES, QTensor
from pgolf.quant.formats import parse_format
from pgolf.quant.scalecoder import can_code, decode_halves, encode_halves
from pgolf.quant.stacks import STACKABLE, StackCache, plan_stacks
from pgolf.quant.streams import (CODED_PACKINGS, FLOAT_PACKINGS, FLOAT_TAGS, PACKINGS, TAG_OF, itemsize, pack_ints, shuffle_planes, tensor_from_bytes,
                                 tensor_to_bytes, unpack_ints, unshuffle_planes)

MAGIC = b"PGOLFAR\x00"
ROTATE_KEY = "rotate"  # meta field of quant.rotate=hadamard (pgolf.quant.rotate)
CONTAINER_VERSION = 3
READ_VERSIONS = (2, 3)  # version 3 added role stacks; a version 2 file is a version 3 file without them
_PREAMBLE = struct.Struct("<8sHBII")
_CRC = struct.Struct("<I")
_MAX_HEADER = 64 << 20
_MAX_CHUNK = 4 << 30
_MAX_NUMEL = 1 << 31
SOLO_MIN_BYTES = 4096
CTX_MIN_VALUES = 4096  # packing=auto tries the context coder on tensors of at least this many values
# ... and keeps it only when it is smaller than the best other packing by at least 1/CTX_MIN_GAIN of
# its size (0.5%): it decodes at ~4 us a value where the order-0 coder takes ~0.1 us, so a 36M-parameter
# model decodes in seconds only if the context coder holds the tensors where it pays
CTX_MIN_GAIN = 200
# ... and codes at most this many values in one artifact with it: the context coder decodes at
# ~4 us a value on this project's CPU (measured: 2048 x 512 int6 in 4.2 s), the order-0 coder at
# ~0.1 us, so a trained 36M-parameter model with every tensor on `ctx` would take ~2.5 minutes to
# load inside the 600 s evaluation. 5M values bound that to ~20 s; above the budget the tensors with
# the largest saving per value keep `ctx`, the others take their best other packing.
CTX_MAX_VALUES = 5_000_000
FTREE_MIN_VALUES = 64  # packing=auto tries range-coding fp16 scale streams of at least this many rows (scalecoder.py)
SHUFFLE_MIN_VALUES = 16  # ... and byte planes for float streams of at least this many values
_FOREIGN_MAGICS = {
    b"\x80": "a pickle / torch.save file",
    b"PK": "a torch.save zip file",
    b"\x28\xb5\x2f\xfd": "a zstd-compressed file (the submissions' .ptz: torch.save + zstd)",
    b"\x78": "a zlib-compressed file (the submissions' zlib fallback .ptz)",
}


@dataclass
class ChunkPlan:
    """How to store the streams. ``default_codec``: a codec name or ``auto``; ``packing`` of the
    integer values: ``int8``/``raw`` (one per byte), ``bitpack``, ``entropy``, ``ctx`` or ``auto``."""

    default_codec: str = "zlib-9"
    packing: str = "raw"
    progress: bool = False


@dataclass
class StreamInfo:
    key: str
    packing: str
    codec: str
    nbytes: int  # bytes of the stream before the chunk codec
    stored_bytes: float  # bytes in the file (a shared chunk's bytes are attributed by nbytes)
    payload: bytes = field(default=b"", repr=False)  # the decompressed stream bytes (reports)
    stack: tuple[int, int] | None = None  # a role stack's member: (first row, stack rows); payload: the stack's


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    fmt: str
    streams: dict[str, StreamInfo]


@dataclass
class ArtifactContents:
    meta: dict
    qtensors: list[QTensor]
    tensors: list[TensorInfo]
    file_bytes: int
    header_bytes: int  # preamble + compressed header + checksum
    header_codec: str
    chunks: list[tuple[str, int, int]]  # (codec, raw_len, len)


# ------------------------------------------------------------------------------------------------
# encoding


def _codec_candidates(codec: str) -> list[str]:
    # auto tries every codec: a missing library raises MissingDependencyError (no silent fallback)
    return [c for c in CODEC_NAMES if c != "none"] if codec == "auto" else [codec]


def _packing_candidates(qt: QTensor, packing: str) -> list[str]:
    if qt.scale is None:
        return ["raw"]
    if packing in ("int8", "raw"):
        return ["raw"]
    if packing == "auto":
        # N < 8 bits: never one value per byte (bit-packed or range-coded); 8 bits: raw bytes are
        # the bit-packed form already
        # the context coder only for tensors large enough for its adaptive statistics to pay
        coded = ["entropy", "ctx"] if qt.values.numel() >= CTX_MIN_VALUES else ["entropy"]
        return (["bitpack"] if parse_format(qt.fmt).bits < 8 else ["raw"]) + coded
    if packing not in PACKINGS:
        raise ArtifactError(f"unknown packing {packing!r}; known: int8, bitpack, entropy, ctx, auto")
    return [packing]


def _workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def _trial_sizes(tasks: list[tuple[str, bytes]], progress: bool) -> list[int]:
    """Compressed sizes of (codec, data) trials, run in a thread pool (zstd, lzma and brotli
    release the GIL; brotli-11 is slow, ~0.5 MB/s per core)."""
    from concurrent.futures import ThreadPoolExecutor

    def size(task: tuple[str, bytes]) -> int:
        codec, data = task
        return len(data) if codec == "none" else len(compress(codec, data))

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        results = pool.map(size, tasks)
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(tasks), desc="export: codec trials", leave=False, dynamic_ncols=True, disable=None)
        return list(results)


@dataclass
class _Pending:
    key: str
    enc: str
    candidates: dict[str, bytes]  # packing -> stream bytes
    trial_codecs: list[str]  # codecs to try ([] = no trial needed)
    packing: str = ""
    codec: str = ""
    group: str = ""
    values: int = 0  # the integers a "v" stream holds (the context coder's decode budget)
    stack: tuple[int, int] | None = None  # (first row, stack rows) of a role stack's member
    holder: "_Pending | None" = None  # the member whose data is the stack (None: this one)

    @property
    def data(self) -> bytes:
        return self.candidates[self.packing]


def _tensor_streams(qt: QTensor, plan: ChunkPlan, codecs: list[str]) -> list[_Pending]:
    """The streams of one tensor with their candidate packings and the codecs worth trying."""

    def raw_stream(key: str, t: torch.Tensor) -> _Pending:
        tag, data = tensor_to_bytes(t)
        # small streams share the "misc" chunk, whose codec is chosen on the concatenation
        candidates = {"raw": data}
        if plan.packing == "auto" and tag in FLOAT_TAGS and t.numel() >= SHUFFLE_MIN_VALUES:
            candidates["shuffle"] = shuffle_planes(data, itemsize(tag))
        trial = codecs if len(data) >= SOLO_MIN_BYTES and (len(codecs) > 1 or len(candidates) > 1) else []
        return _Pending(key, tag, candidates, trial)

    if qt.scale is None:
        return [raw_stream("v", qt.values)]
    fmt = parse_format(qt.fmt)
    auto = plan.packing == "auto"
    candidates = {p: pack_ints(qt.values, fmt, p) for p in _packing_candidates(qt, plan.packing)}
    trial = codecs if len(candidates) > 1 or len(codecs) > 1 else []
    scales = raw_stream("s", qt.scale)
    if auto and qt.scale.dtype == torch.float16 and qt.scale.numel() >= FTREE_MIN_VALUES:
        halves = qt.scale.detach().cpu().numpy()
        if can_code(halves):  # range-coded fp16 patterns (bf16 / fp32 scales stay byte streams)
            scales.candidates["ftree"] = encode_halves(halves)
    out = [_Pending("v", "i8", candidates, trial, values=qt.values.numel()), scales]
    if qt.lqer is not None:  # LQER factors: bit-packed (or range-coded) integers + fp16 scales
        fa, fb = qt.lqer.formats

        def factor(key: str, q: torch.Tensor, ffmt) -> _Pending:
            data = {"bitpack": pack_ints(q, ffmt, "bitpack")}
            if auto:  # A's int2 codes are mostly 0: an order-0 range coder beats their 2 bits
                data["entropy"] = pack_ints(q, ffmt, "entropy")
            return _Pending(key, "i8", data, codecs if len(codecs) > 1 and len(data["bitpack"]) >= SOLO_MIN_BYTES else [])

        out += [factor("la", qt.lqer.qa, fa), raw_stream("las", qt.lqer.sa), factor("lb", qt.lqer.qb, fb), raw_stream("lbs", qt.lqer.sb)]
    return out


def _decide(pending: list[_Pending], codecs: list[str], progress: bool) -> None:
    """Set every stream's (packing, codec) to the smallest measured combination."""
    tasks, owners = [], []
    deferred = [p for p in pending if not p.trial_codecs and len(p.candidates) > 1]  # see _decide_small
    deferred_ids = {id(p) for p in deferred}
    for p in pending:
        if id(p) in deferred_ids:
            continue
        for packing, data in p.candidates.items():
            for codec in (["none"] if packing in CODED_PACKINGS else p.trial_codecs):
                tasks.append((codec, data))
                owners.append((p, packing, codec))
    best: dict[int, tuple[int, str, str]] = {}
    best_plain: dict[int, tuple[int, str, str]] = {}  # the best without the context coder
    for (p, packing, codec), size in zip(owners, _trial_sizes(tasks, progress)):
        if packing != "ctx" and (id(p) not in best_plain or size < best_plain[id(p)][0]):
            best_plain[id(p)] = (size, packing, codec)
        size += size // CTX_MIN_GAIN if packing == "ctx" else 0
        if id(p) not in best or size < best[id(p)][0]:
            best[id(p)] = (size, packing, codec)
    # packing="ctx" asked for explicitly has no other candidate: what the user asked for is kept
    _ctx_budget([p for p in pending if id(p) in best and best[id(p)][1] == "ctx" and id(p) in best_plain], best, best_plain)
    for p in pending:
        if id(p) in best:
            _, p.packing, p.codec = best[id(p)]
        else:  # a single candidate and nothing to try (or deferred: the first candidate for now)
            p.packing = next(iter(p.candidates))
            p.codec = "none" if p.packing in CODED_PACKINGS else codecs[0]
        if id(p) not in deferred_ids:
            p.candidates = {p.packing: p.candidates[p.packing]}  # free the losers
    _decide_small(deferred, codecs)


def _ctx_budget(ctx: list[_Pending], best: dict[int, tuple[int, str, str]], best_plain: dict[int, tuple[int, str, str]]) -> None:
    """Keep the context coder's decode time bounded: when the streams that chose ``ctx`` hold more
    than ``CTX_MAX_VALUES`` integers, those with the largest saving per value keep it (in that
    order, while the total fits) and the others fall back to their best other packing."""
    if sum(p.values for p in ctx) <= CTX_MAX_VALUES:
        return
    # a stable sort: equal savings keep the artifact's tensor order, so the choice is deterministic
    ranked = sorted(ctx, key=lambda p: (best[id(p)][0] - best_plain[id(p)][0]) / max(p.values, 1))
    kept = 0
    for p in ranked:
        if kept + p.values <= CTX_MAX_VALUES:
            kept += p.values
        else:
            best[id(p)] = best_plain[id(p)]


def _decide_small(small: list[_Pending], codecs: list[str]) -> None:
    """Streams with alternatives but no codec trial of their own (small ones, which share a
    chunk, so what they compress to depends on their neighbours) are decided by kind, a kind being
    (stream key, packing): ``("s", "ftree")`` scales, ``("v", "shuffle")`` floats, ``("la",
    "entropy")`` LQER factors, ... on a measured total: the deferred streams' concatenation
    compressed with the best codec plus the range-coded streams' sizes. A kind is switched on only
    when it lowers that total (greedily, the largest saving first); of two switched-on kinds for
    one stream the later one holds."""
    from concurrent.futures import ThreadPoolExecutor

    kinds = sorted({(p.key, k) for p in small for k in p.candidates if k != p.packing})
    if not kinds:
        return
    base = {id(p): p.packing for p in small}

    def pick(p: _Pending, switched: list[tuple[str, str]]) -> str:
        # the kind switched on last wins where a stream has several (scales: shuffle, then ftree)
        return next((k for key, k in reversed(switched) if key == p.key and k in p.candidates), base[id(p)])

    def total(switched: list[tuple[str, str]]) -> int:
        shared, coded = [], 0
        for p in small:
            k = pick(p, switched)
            if k in CODED_PACKINGS:
                coded += len(p.candidates[k])
            else:
                shared.append(p.candidates[k])
        raw = b"".join(shared)
        return coded + (min(len(compress(c, raw)) for c in codecs) if raw else 0)

    switched: list[tuple[str, str]] = []
    best = total(switched)
    while True:
        untried = [k for k in kinds if k not in switched]
        with ThreadPoolExecutor(max_workers=_workers()) as pool:  # the codecs release the GIL
            trials = dict(zip(untried, pool.map(lambda k: total([*switched, k]), untried)))
        k = min(trials, key=trials.get, default=None)
        if k is None or trials[k] >= best:
            break
        switched.append(k)
        best = trials[k]
    for p in small:
        p.packing = pick(p, switched)
        p.codec = "none" if p.packing in CODED_PACKINGS else codecs[0]
        p.candidates = {p.packing: p.candidates[p.packing]}


def _group_of(p: _Pending, auto: bool, solo_id: str) -> str:
    if p.codec == "none":
        return "none"
    if not auto:
        return "shared"
    return solo_id if len(p.data) >= SOLO_MIN_BYTES else "misc"


def encode_artifact(qtensors: list[QTensor], meta: dict, plan: ChunkPlan | None = None) -> bytes:
    plan = plan or ChunkPlan()
    auto = plan.default_codec == "auto"
    if not auto and plan.default_codec not in CODEC_IDS:
        raise ArtifactError(f"unknown codec {plan.default_codec!r}; known: {', '.join(CODEC_NAMES)}, auto")
    codecs = _codec_candidates(plan.default_codec)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=_workers()) as pool:  # numpy and the range coder release the GIL
        results = pool.map(lambda qt: _tensor_streams(qt, plan, codecs), qtensors)
        if plan.progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(qtensors), desc="export: packing", leave=False, dynamic_ncols=True, disable=None)
        per_tensor = list(results)
    _decide([p for streams in per_tensor for p in streams], codecs, plan.progress)
    if plan.packing == "auto":
        _stack_roles(qtensors, per_tensor)
    groups: dict[str, list[_Pending]] = {}
    for ti, streams in enumerate(per_tensor):
        for p in streams:
            if p.holder is not None:  # a stack member whose rows are in another member's stream
                continue
            p.group = _group_of(p, auto, f"solo{ti}{p.key}")
            groups.setdefault(p.group, []).append(p)
    chunk_specs, compressed, chunk_of, offset_of = [], [], {}, {}
    for gkey, parts in groups.items():
        raw = b"".join(p.data for p in parts)
        if gkey == "misc":  # the small streams together: the codec that compresses them best
            trials = {c: compress(c, raw) for c in codecs}
            codec = min(trials, key=lambda c: len(trials[c]))
            z = trials[codec]
        else:
            codec = parts[0].codec
            z = compress(codec, raw)
        pos = 0
        for p in parts:
            offset_of[id(p)] = pos
            pos += len(p.data)
        chunk_of[gkey] = len(chunk_specs)
        chunk_specs.append([codec, len(raw), len(z)])
        compressed.append(z)

    def entry(p: _Pending) -> list:
        h = p.holder or p
        return [p.key, chunk_of[h.group], offset_of[id(h)], len(h.data), p.enc, p.packing] + (list(p.stack) if p.stack else [])

    tensors = [
        [qt.name, list(qt.shape), qt.dtype, qt.fmt, [entry(p) for p in streams]] + ([qt.lqer.descriptor()] if qt.lqer is not None else [])
        for qt, streams in zip(qtensors, per_tensor)
    ]
    meta = _with_rotation(qtensors, meta)
    header_raw = json.dumps({"meta": meta, "chunks": chunk_specs, "tensors": tensors}, separators=(",", ":")).encode("utf-8")
    hdr_codec = min(dict.fromkeys(["zlib-9"] + [c for c in codecs if c != "none"]), key=lambda c: len(compress(c, header_raw)))
    header = compress(hdr_codec, header_raw)
    body = _PREAMBLE.pack(MAGIC, CONTAINER_VERSION, CODEC_IDS[hdr_codec], len(header), len(header_raw)) + header + b"".join(compressed)
    return body + _CRC.pack(zlib.crc32(body))


def _stack_roles(qtensors: list[QTensor], per_tensor: list[list[_Pending]]) -> None:
    """Code the same matrix of every block as one stream where that is smaller (``stacks.py``)."""
    ints = [(qt, streams[0]) for qt, streams in zip(qtensors, per_tensor) if qt.scale is not None and streams[0].key == "v"]
    items = [(qt.name, qt.fmt, qt.values.reshape(qt.values.shape[0], -1), p.packing, len(p.data)) for qt, p in ints]
    for stack in plan_stacks(items, lambda q, fmt, packing: pack_ints(q, parse_format(fmt), packing)):
        first, total = 0, sum(stack.rows)
        holder = ints[stack.members[0]][1]
        for i, rows in zip(stack.members, stack.rows):
            p = ints[i][1]
            p.packing, p.candidates, p.codec, p.stack = stack.packing, {stack.packing: b""}, "none", (first, total)
            p.holder = None if p is holder else holder
            first += rows
        holder.candidates = {stack.packing: stack.data}


def _with_rotation(qtensors: list[QTensor], meta: dict) -> dict:
    """``meta["rotate"]`` for the rotated tensors (``pgolf.quant.rotate``); ``meta`` unchanged when
    none is rotated (rotate=none writes the same bytes as before the switch existed)."""
    rotated = [qt for qt in qtensors if qt.rotation is not None]
    if not rotated:
        return meta
    seeds = {qt.rotation.seed for qt in rotated}
    if len(seeds) != 1 or any(qt.rotation.name != qt.name for qt in rotated):
        raise ArtifactError("rotated tensors must share one rotation seed and carry their own names")
    return {**meta, ROTATE_KEY: {"kind": "hadamard", "seed": seeds.pop(), "tensors": [qt.name for qt in rotated]}}


# ------------------------------------------------------------------------------------------------
# decoding


class _Reject(Exception):
    """Internal: a malformed field; becomes ArtifactError with the file name."""


def _int(v, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _Reject(f"{what}: expected an integer in [{lo}, {hi}], got {v!r}")
    return v


def _str(v, what: str) -> str:
    if not isinstance(v, str):
        raise _Reject(f"{what}: expected a string, got {type(v).__name__}")
    return v


def _list(v, what: str, n: int | None = None) -> list:
    if not isinstance(v, list) or (n is not None and len(v) != n):
        raise _Reject(f"{what}: expected a list{'' if n is None else f' of {n} items'}")
    return v


def _read_preamble(blob: bytes) -> tuple[int, int, int, int, int]:
    if len(blob) < _PREAMBLE.size + _CRC.size or blob[:8] != MAGIC:
        for magic, what in _FOREIGN_MAGICS.items():
            if blob.startswith(magic):
                raise _Reject(f"not a pgolf artifact: it looks like {what}; pgolf never unpickles or runs artifact contents")
        if blob[:8] != MAGIC:
            raise _Reject("not a pgolf artifact (bad magic)")
        raise _Reject(f"too short to be a pgolf artifact ({len(blob)} bytes)")
    _, version, hdr_codec_id, hdr_len, hdr_raw_len = _PREAMBLE.unpack_from(blob, 0)
    if version not in READ_VERSIONS:
        raise _Reject(f"unsupported artifact version {version} (this pgolf reads versions {', '.join(map(str, READ_VERSIONS))}); "
                      "re-export it with this pgolf (`pgolf export`) or use the pgolf that wrote it")
    (crc,) = _CRC.unpack_from(blob, len(blob) - _CRC.size)
    if zlib.crc32(memoryview(blob)[: -_CRC.size]) != crc:
        raise _Reject("checksum mismatch: the file is truncated or corrupted")
    return version, hdr_codec_id, hdr_len, hdr_raw_len, _PREAMBLE.size


def decode_artifact(blob: bytes, source: str = "<bytes>", *, keep_payload: bool = False) -> ArtifactContents:
    """Parse and validate a whole artifact. ``keep_payload`` keeps each stream's bytes (reports)."""
    try:
        return _decode(blob, keep_payload)
    except _Reject as exc:
        raise ArtifactError(f"{source}: {exc}") from None


def _decode(blob: bytes, keep_payload: bool) -> ArtifactContents:
    version, hdr_codec_id, hdr_len, hdr_raw_len, pos = _read_preamble(blob)
    body_end = len(blob) - _CRC.size
    codec_names = {v: k for k, v in CODEC_IDS.items()}
    if hdr_codec_id not in codec_names or hdr_raw_len > _MAX_HEADER:
        raise _Reject("malformed header (unknown codec or absurd size)")
    if pos + hdr_len > body_end:
        raise _Reject("header runs past the end of the file")
    try:
        header = json.loads(decompress(codec_names[hdr_codec_id], blob[pos : pos + hdr_len], hdr_raw_len))
    except (ArtifactError, ValueError) as exc:
        raise _Reject(f"malformed header ({exc})") from None
    if not isinstance(header, dict) or set(header) != {"meta", "chunks", "tensors"} or not isinstance(header["meta"], dict):
        raise _Reject("malformed header (expected the keys meta, chunks, tensors)")
    pos += hdr_len
    header_bytes = pos + _CRC.size
    chunks: list[bytes] = []
    chunk_specs: list[tuple[str, int, int]] = []
    for i, spec in enumerate(_list(header["chunks"], "chunk table")):
        codec, raw_len, length = _list(spec, f"chunk {i}", 3)
        if codec not in CODEC_IDS:
            raise _Reject(f"chunk {i}: unknown codec {codec!r}")
        raw_len, length = _int(raw_len, f"chunk {i} raw_len", 0, _MAX_CHUNK), _int(length, f"chunk {i} len")
        if pos + length > body_end:
            raise _Reject(f"chunk {i} runs past the end of the file")
        try:
            chunks.append(decompress(codec, blob[pos : pos + length], raw_len))
        except ArtifactError as exc:
            raise _Reject(f"chunk {i}: {exc}") from None
        chunk_specs.append((codec, raw_len, length))
        pos += length
    if pos != body_end:
        raise _Reject(f"{body_end - pos} unexpected bytes after the last chunk")
    # attribute shared chunks' compressed bytes to their streams by their share of the raw bytes
    ratio = [(length / raw_len if raw_len else 0.0) for _, raw_len, length in chunk_specs]
    qtensors, infos, seen = [], [], set()
    total_numel = 0
    stacks = StackCache() if version >= 3 else None  # version 2 files have no stacks
    for spec in _list(header["tensors"], "tensor table"):
        qt, info = _decode_tensor(spec, chunks, chunk_specs, ratio, keep_payload, stacks)
        if qt.name in seen:
            raise _Reject(f"tensor {qt.name!r} appears twice")
        seen.add(qt.name)
        total_numel += qt.numel
        if total_numel > _MAX_NUMEL:
            raise _Reject("more than 2^31 values in total")
        qtensors.append(qt)
        infos.append(info)
    if ROTATE_KEY in header["meta"]:
        _attach_rotation(header["meta"][ROTATE_KEY], qtensors)
    return ArtifactContents(header["meta"], qtensors, infos, len(blob), header_bytes, codec_names[hdr_codec_id], chunk_specs)


_LQER_KEYS = ("la", "las", "lb", "lbs")


def _attach_rotation(spec, qtensors: list[QTensor]) -> None:
    """Validate ``meta["rotate"]`` and give each named tensor its rotation (undone at dequantisation)."""
    from pgolf.errors import ConfigError
    from pgolf.quant.rotate import Rotation

    if not isinstance(spec, dict) or set(spec) != {"kind", "seed", "tensors"}:
        raise _Reject(f"meta {ROTATE_KEY}: expected an object with the keys kind, seed, tensors")
    if spec["kind"] != "hadamard":
        raise _Reject(f"meta {ROTATE_KEY}: unknown rotation kind {spec['kind']!r} (this pgolf knows hadamard)")
    seed = _int(spec["seed"], f"meta {ROTATE_KEY} seed", 0, (1 << 62) - 1)
    by_name = {qt.name: qt for qt in qtensors}
    names = [_str(n, f"meta {ROTATE_KEY} tensor name") for n in _list(spec["tensors"], f"meta {ROTATE_KEY} tensors")]
    if len(set(names)) != len(names):
        raise _Reject(f"meta {ROTATE_KEY}: a tensor is listed twice")
    for name in names:
        qt = by_name.get(name)
        if qt is None:
            raise _Reject(f"meta {ROTATE_KEY}: names {name!r}, which is not in the artifact")
        if qt.scale is None or len(qt.shape) != 2:
            raise _Reject(f"meta {ROTATE_KEY}: {name!r} is not a 2-D integer-format matrix")
        try:
            qt.rotation = Rotation.for_tensor(seed, name, qt.shape)
        except ConfigError as exc:
            raise _Reject(f"meta {ROTATE_KEY}: {exc}") from None


def _decode_tensor(spec, chunks: list[bytes], chunk_specs, ratio: list[float], keep_payload: bool, stacks) -> tuple[QTensor, TensorInfo]:
    spec = _list(spec, "tensor entry")
    if len(spec) not in (5, 6):
        raise _Reject("tensor entry: expected a list of 5 or 6 items")
    name, shape, dtype, fmt, streams = spec[:5]
    lqer_desc = spec[5] if len(spec) == 6 else None
    name = _str(name, "tensor name")
    where = f"tensor {name!r}"
    shape = tuple(_int(d, f"{where} shape", 0, _MAX_NUMEL) for d in _list(shape, f"{where} shape"))
    if len(shape) > 8:
        raise _Reject(f"{where}: {len(shape)} dimensions")
    numel = math.prod(shape)  # exact (no int64 wrap-around on a hostile shape)
    if numel > _MAX_NUMEL:
        raise _Reject(f"{where}: shape {list(shape)} is too large")
    if _str(dtype, f"{where} dtype") not in TORCH_DTYPES:
        raise _Reject(f"{where}: unknown dtype {dtype!r}")
    fmt = _str(fmt, f"{where} format")
    try:
        parsed = None if fmt == "raw" else parse_format(fmt)
    except ValueError:
        raise _Reject(f"{where}: unknown format {fmt!r}") from None
    is_int = parsed is not None and parsed.kind == "int"
    rows = (shape[0] if len(shape) >= 2 else 1) if is_int else 0
    cols = numel // rows if rows else 0
    if fmt == "raw":
        want_tag = TAG_OF[TORCH_DTYPES[dtype]]
    elif not is_int:
        want_tag = TAG_OF[parsed.float_dtype]
    else:
        want_tag = "i8"
    lqer = None
    if lqer_desc is not None:
        if not is_int or len(shape) != 2:
            raise _Reject(f"{where}: an LQER correction needs a 2-D integer tensor")
        mode, rank, param = _list(lqer_desc, f"{where} LQER descriptor", 3)
        if mode not in ("asym", "sym"):
            raise _Reject(f"{where}: unknown LQER mode {mode!r}")
        lqer = (mode, _int(rank, f"{where} LQER rank", 1, min(shape)), _int(param, f"{where} LQER parameter", 1, 1 << 20))
    allowed = ("v", "s") + (_LQER_KEYS if lqer else ())
    found: dict[str, torch.Tensor] = {}
    infos: dict[str, StreamInfo] = {}
    for s in _list(streams, f"{where} streams"):
        s = _list(s, f"{where} stream")
        stack = None
        if len(s) == 8 and stacks is not None and s[0] == "v" and is_int and s[5] in STACKABLE:
            stack = (_int(s[6], f"{where} first row", 0, _MAX_NUMEL), _int(s[7], f"{where} stack rows", 1, _MAX_NUMEL))
            if stack[1] * cols > _MAX_NUMEL or stack[0] + rows > stack[1]:
                raise _Reject(f"{where}: rows {stack[0]}..{stack[0] + rows} do not fit its stack of {stack[1]} rows")
        elif len(s) != 6:
            raise _Reject(f"{where} stream: expected a list of 6 items (8 for a role stack's values)")
        key, chunk, offset, nbytes, enc, packing = s[:6]
        if key not in allowed or key in found or (key == "s" and not is_int):
            raise _Reject(f"{where}: unexpected stream {key!r}")
        if not chunks:
            raise _Reject(f"{where}: stream {key!r} but the file has no chunks")
        chunk = _int(chunk, f"{where} stream {key} chunk", 0, len(chunks) - 1)
        offset, nbytes = _int(offset, f"{where} offset"), _int(nbytes, f"{where} nbytes")
        if offset + nbytes > len(chunks[chunk]):
            raise _Reject(f"{where}: stream {key!r} points outside its chunk")
        data = chunks[chunk][offset : offset + nbytes]
        float_stream = key in ("s", "las", "lbs") or not is_int
        allowed_packings = {"s": (*FLOAT_PACKINGS, "ftree"), "la": ("bitpack", "entropy"), "lb": ("bitpack", "entropy")}.get(
            key, FLOAT_PACKINGS if float_stream else PACKINGS)
        if packing not in allowed_packings:
            raise _Reject(f"{where}: packing {packing!r} is not allowed for stream {key!r} of format {fmt}")
        try:
            if packing == "shuffle":
                if enc not in FLOAT_TAGS:
                    raise ValueError(f"byte planes hold float encodings, not {enc!r}")
                data = unshuffle_planes(data, itemsize(enc))
            if key in ("la", "lb"):
                if enc != "i8":
                    raise ValueError(f"LQER factors must have encoding i8, got {enc!r}")
                from pgolf.quant.lqer import ASYM_A, ASYM_B, sym_format

                mode, rank, param = lqer
                if mode == "sym" and not 2 <= param <= 8:
                    raise ValueError(f"LQER: sym factor bits {param} outside 2..8")
                ffmt = (ASYM_A if key == "la" else ASYM_B) if mode == "asym" else sym_format(param)
                r_, c_ = (shape[0], rank) if key == "la" else (rank, cols)
                t = unpack_ints(data, packing, ffmt, r_, c_)
            elif key in ("las", "lbs"):
                if enc != "f16":
                    raise ValueError(f"LQER scales must have encoding f16, got {enc!r}")
                if nbytes % 2:
                    raise ValueError(f"{nbytes} bytes is not a whole number of f16 scales")
                t = tensor_from_bytes(enc, data, nbytes // 2)
            elif key == "s":
                if enc not in FLOAT_TAGS or (packing == "ftree" and enc != "f16"):
                    raise ValueError(f"scale encoding {enc!r} is not a float encoding{' (ftree: f16 only)' if enc in FLOAT_TAGS else ''}")
                t = torch.from_numpy(decode_halves(data, rows)) if packing == "ftree" else tensor_from_bytes(enc, data, rows)
                if rows and not (torch.isfinite(t.float()).all() and (t.float() > 0).all()):
                    raise ValueError("scales must be finite and positive")
            elif is_int:
                if enc != "i8":
                    raise ValueError(f"integer values must have encoding i8, got {enc!r}")
                if stack is None:
                    t = unpack_ints(data, packing, parsed, rows, cols)
                else:  # decoded once for all its members; this tensor's rows of it
                    sid = (chunk, offset, nbytes, packing, parsed.bits, stack[1], cols)
                    t = stacks.rows(sid, stack[0], rows, lambda: unpack_ints(data, packing, parsed, stack[1], cols))
            else:
                if enc != want_tag:
                    raise ValueError(f"encoding {enc!r} does not match format {fmt} / dtype {dtype}")
                t = tensor_from_bytes(enc, data, numel)
        except ValueError as exc:
            raise _Reject(f"{where}: stream {key!r}: {exc}") from None
        found[key] = t
        codec = chunk_specs[chunk][0]
        share = rows / stack[1] if stack else 1.0  # a stack's bytes are attributed to its members by rows
        infos[key] = StreamInfo(key, packing, codec, round(nbytes * share), nbytes * share * ratio[chunk], data if keep_payload else b"", stack)
    if "v" not in found or (is_int and "s" not in found):
        raise _Reject(f"{where}: missing {'values' if 'v' not in found else 'scale'} stream")
    values = found["v"] if is_int else found["v"].reshape(shape)
    lq = None
    if lqer is not None:
        from pgolf.quant.lqer import Lqer, check_lqer

        missing = [k for k in _LQER_KEYS if k not in found]
        if missing:
            raise _Reject(f"{where}: LQER correction without its {missing[0]!r} stream")
        lq = Lqer(lqer[0], lqer[1], lqer[2], found["la"], found["las"], found["lb"], found["lbs"])
        try:
            check_lqer(lq, rows, cols)
        except ValueError as exc:
            raise _Reject(f"{where}: {exc}") from None
    qt = QTensor(name, shape, dtype, fmt, values, found.get("s"), lq)
    return qt, TensorInfo(name, shape, dtype, fmt, infos)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_artifact_contents(path: str | Path, *, keep_payload: bool = False) -> ArtifactContents:
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read artifact ({exc.strerror})") from None
    return decode_artifact(blob, str(path), keep_payload=keep_payload)


def read_artifact(path: str | Path) -> tuple[dict, list[QTensor]]:
    """(meta, tensors) of an artifact file, fully validated; never executes anything."""
    contents = read_artifact_contents(path)
    return contents.meta, contents.qtensors
