"""R7's per-group compression (COMPRESSOR=pergroup, frontier.md 3.15) as a comparison codec.

The quantised integers of the block matrices are pooled by role across layers into 7 groups, in
R7's order: ``tok_emb``, ``attn.c_k``, ``attn.c_q``, ``attn.c_v``, ``attn.proj``, ``mlp.fc``,
``mlp.proj`` (layer order inside a group). In the "hot" groups (tok_emb, c_q, mlp.fc) each
matrix's rows are reordered by greedy L1 nearest neighbour (start at row 0, repeatedly append the
unused row closest in L1 to the last one; the permutation is stored as uint16). Every matrix is
stored transposed (column-major), the group's matrices are concatenated, and each group blob is
compressed with ``lrzip -z -L 9`` (ZPAQ). Everything else (the scales, float tensors, integer
tensors outside the groups, LQER factors, and the manifest of names and shapes) is one
"remainder" stream compressed with brotli q11 lgwin 24; the permutations are one brotli stream.
File: ``b"PGRP"``, u32 stream count, u32 lengths, the streams.

The ``lrzip`` system binary is required: without it ``require_lrzip`` raises
``MissingDependencyError`` saying so (the comparison reports then give ``null`` for this scheme).
This is not pgolf's artifact format (which never depends on an external program); it exists to
measure what the record's scheme achieves on the same integers. Decoding validates every field
and never executes anything from the file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pgolf.errors import ArtifactError, MissingDependencyError
from pgolf.quant.export import TORCH_DTYPES, QTensor
from pgolf.quant.formats import parse_format
from pgolf.quant.streams import FLOAT_TAGS, tensor_from_bytes, tensor_to_bytes

GROUPS = ("tok_emb", "attn.c_k", "attn.c_q", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")
HOT_GROUPS = ("tok_emb", "attn.c_q", "mlp.fc")
MAGIC = b"PGRP"
LRZIP_TIMEOUT = 3600.0


def group_of(name: str) -> str | None:
    """R7's group of an integer tensor by name (None: the remainder)."""
    if name in ("tok_emb.weight",):
        return "tok_emb"
    for g in GROUPS[1:]:
        if name.endswith(f".{g}.weight"):
            return g
    return None


# ------------------------------------------------------------------------------------------------
# lrzip


def lrzip_path() -> str | None:
    return shutil.which("lrzip")


def require_lrzip() -> str:
    path = lrzip_path()
    if path is None:
        raise MissingDependencyError(
            "the per-group scheme (R7's COMPRESSOR=pergroup) needs the lrzip system binary (apt-get install lrzip); "
            "it is not installed here, so this comparison is skipped"
        )
    return path


def _lrzip(args: list[str], data: bytes, suffix: str) -> bytes:
    exe = require_lrzip()
    with tempfile.TemporaryDirectory(prefix="pgolf-lrzip-") as tmp:
        src, dst = Path(tmp) / f"in{suffix}", Path(tmp) / "out"
        src.write_bytes(data)
        env = {**os.environ, "LRZIP": "NOCONFIG"}  # no user lrzip.conf changes the result
        proc = subprocess.run([exe, *args, "-Q", "-f", "-o", str(dst), str(src)], capture_output=True, env=env, timeout=LRZIP_TIMEOUT)
        if proc.returncode != 0 or not dst.is_file():
            raise ArtifactError(f"lrzip {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace').strip()[:200]}")
        return dst.read_bytes()


def lrzip_compress(data: bytes) -> bytes:
    """``lrzip -z -L 9`` (ZPAQ back-end) of ``data``."""
    return _lrzip(["-z", "-L", "9"], data, "")


def lrzip_decompress(data: bytes) -> bytes:
    return _lrzip(["-d"], data, ".lrz")


# ------------------------------------------------------------------------------------------------
# row reordering


def greedy_l1_order(q: np.ndarray) -> np.ndarray:
    """Greedy nearest-neighbour row order: start at row 0, then repeatedly the unused row with the
    smallest L1 distance to the last appended one (ties: the lowest index); the context coder's
    search (``ctxcoder.greedy_l1_order``, exact integer distances)."""
    from pgolf.quant.ctxcoder import greedy_l1_order as order

    return order(q)


# ------------------------------------------------------------------------------------------------
# encode / decode


@dataclass
class PergroupResult:
    blob: bytes
    group_bytes: dict[str, int]  # lrzip bytes per group
    group_values: dict[str, int]  # integer values per group
    remainder_bytes: int
    perm_bytes: int
    overhead_bytes: int
    group_raw: dict[str, bytes] = field(default_factory=dict, repr=False)


def _brotli(data: bytes) -> bytes:
    from pgolf.quant.codecs import _brotli as lib

    return lib().compress(data, quality=11, lgwin=24)


def encode_pergroup(qtensors: list[QTensor], meta: dict | None = None) -> PergroupResult:
    """The per-group file of ``qtensors`` (see the module docstring)."""
    require_lrzip()
    members: dict[str, list[QTensor]] = {g: [] for g in GROUPS}
    for qt in qtensors:
        g = group_of(qt.name) if qt.scale is not None and len(qt.shape) == 2 else None
        if g is not None:
            members[g].append(qt)
    grouped = {qt.name: g for g, lst in members.items() for qt in lst}
    manifest, rest, pos = [], [], 0

    def put(data: bytes, enc: str) -> list:
        nonlocal pos
        rest.append(data)
        pos += len(data)
        return [pos - len(data), len(data), enc]

    for qt in qtensors:
        streams = {}
        if qt.name not in grouped:
            tag, data = tensor_to_bytes(qt.values)
            streams["v"] = put(data, tag)
        if qt.scale is not None:
            streams["s"] = put(*reversed(tensor_to_bytes(qt.scale)))
        lq = None
        if qt.lqer is not None:
            lq = qt.lqer.descriptor()
            for key, t in (("la", qt.lqer.qa), ("las", qt.lqer.sa), ("lb", qt.lqer.qb), ("lbs", qt.lqer.sb)):
                streams[key] = put(*reversed(tensor_to_bytes(t)))
        manifest.append([qt.name, list(qt.shape), qt.dtype, qt.fmt, grouped.get(qt.name), streams, lq])
    perms, group_raw, group_values = [], {}, {}
    for g in GROUPS:
        parts = []
        for qt in members[g]:
            q = qt.values.numpy().reshape(qt.values.shape[0], -1)
            if g in HOT_GROUPS:
                order = greedy_l1_order(q)
                perms.append(order.astype("<u2" if q.shape[0] <= 65536 else "<u4").tobytes())
                q = q[order]
            parts.append(np.ascontiguousarray(q.T).tobytes())
        group_raw[g] = b"".join(parts)
        group_values[g] = len(group_raw[g])
    head = json.dumps({"meta": meta or {}, "tensors": manifest}, separators=(",", ":")).encode()
    remainder = struct.pack("<I", len(head)) + head + b"".join(rest)
    streams = [lrzip_compress(group_raw[g]) if group_raw[g] else b"" for g in GROUPS]
    streams += [_brotli(remainder), _brotli(b"".join(perms))]
    overhead = 4 + 4 + 4 * len(streams)
    blob = MAGIC + struct.pack(f"<I{len(streams)}I", len(streams), *map(len, streams)) + b"".join(streams)
    return PergroupResult(blob, {g: len(s) for g, s in zip(GROUPS, streams)}, group_values, len(streams[-2]), len(streams[-1]), overhead, group_raw)


def decode_pergroup(blob: bytes, source: str = "<pergroup>") -> tuple[dict, list[QTensor]]:
    """Inverse of ``encode_pergroup``: (meta, tensors); ArtifactError on anything malformed."""
    try:
        return _decode(blob)
    except (ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        raise ArtifactError(f"{source}: not a valid per-group file ({exc})") from None


def _decode(blob: bytes) -> tuple[dict, list[QTensor]]:
    from pgolf.quant.lqer import Lqer, check_lqer

    if blob[:4] != MAGIC:
        raise ValueError("bad magic")
    (n,) = struct.unpack_from("<I", blob, 4)
    if n != len(GROUPS) + 2:
        raise ValueError(f"{n} streams, expected {len(GROUPS) + 2}")
    lens = struct.unpack_from(f"<{n}I", blob, 8)
    pos = 8 + 4 * n
    if pos + sum(lens) != len(blob):
        raise ValueError("stream lengths do not add up to the file size")
    streams = []
    for length in lens:
        streams.append(blob[pos : pos + length])
        pos += length
    groups = {g: (lrzip_decompress(s) if s else b"") for g, s in zip(GROUPS, streams)}
    remainder = _brotli_decompress(streams[-2])
    perms = _brotli_decompress(streams[-1])
    (hlen,) = struct.unpack_from("<I", remainder, 0)
    head = json.loads(remainder[4 : 4 + hlen])
    rest = remainder[4 + hlen :]
    out, gpos = [], {g: 0 for g in GROUPS}
    # the permutations are stored group by group (GROUPS order), layer order inside a group
    perm_len = {g: 0 for g in GROUPS}
    for entry in head["tensors"]:
        g, shape = entry[4], entry[1]
        if g in HOT_GROUPS:
            rows = int(shape[0])
            perm_len[g] += (2 if rows <= 65536 else 4) * rows
    pstart, acc = {}, 0
    for g in GROUPS:
        pstart[g] = acc
        acc += perm_len[g]
    if acc != len(perms):
        raise ValueError("the permutation stream does not match the hot groups' rows")

    def take(spec: list, numel: int | None = None) -> torch.Tensor:
        off, nbytes, enc = spec
        if off < 0 or off + nbytes > len(rest):
            raise ValueError("a stream points outside the remainder")
        data = rest[off : off + nbytes]
        from pgolf.quant.streams import itemsize

        return tensor_from_bytes(enc, data, nbytes // itemsize(enc) if numel is None else numel)

    for name, shape, dtype, fmt, g, streams_of, lq in head["tensors"]:
        shape = tuple(int(d) for d in shape)
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"{name}: unknown dtype {dtype!r}")
        numel = int(np.prod(shape)) if shape else 1
        parsed = None if fmt == "raw" else parse_format(fmt)
        is_int = parsed is not None and parsed.kind == "int"
        rows = (shape[0] if len(shape) >= 2 else 1) if is_int else 0
        cols = numel // rows if rows else 0
        scale = None
        if is_int:
            scale = take(streams_of["s"], rows)
            if streams_of["s"][2] not in FLOAT_TAGS or not (scale.float() > 0).all():
                raise ValueError(f"{name}: bad scales")
        if g is not None:
            if g not in GROUPS or not is_int:
                raise ValueError(f"{name}: bad group {g!r}")
            data = groups[g][gpos[g] : gpos[g] + numel]
            if len(data) != numel:
                raise ValueError(f"{name}: group {g} is too short")
            gpos[g] += numel
            q = np.frombuffer(data, dtype=np.int8).reshape(cols, rows).T.copy()
            if g in HOT_GROUPS:
                width = 2 if rows <= 65536 else 4
                ppos = pstart[g]
                order = np.frombuffer(perms[ppos : ppos + width * rows], dtype="<u2" if width == 2 else "<u4").astype(np.int64)
                pstart[g] += width * rows
                if order.size != rows or not np.array_equal(np.sort(order), np.arange(rows)):
                    raise ValueError(f"{name}: bad row permutation")
                unpermuted = np.empty_like(q)
                unpermuted[order] = q
                q = unpermuted
            values = torch.from_numpy(q)
        else:
            values = take(streams_of["v"], numel if not is_int else rows * cols)
            values = values.reshape(rows, cols) if is_int else values.reshape(shape)
        if is_int and values.numel() and (int(values.min()) < parsed.qmin or int(values.max()) > parsed.qmax):
            raise ValueError(f"{name}: values outside the {fmt} grid")
        lqer = None
        if lq is not None:
            mode, rank, param = lq
            lqer = Lqer(mode, int(rank), int(param), take(streams_of["la"], rows * rank).reshape(rows, rank), take(streams_of["las"]),
                        take(streams_of["lb"], rank * cols).reshape(rank, cols), take(streams_of["lbs"]))
            check_lqer(lqer, rows, cols)
        out.append(QTensor(name, shape, dtype, fmt, values, scale, lqer))
    if any(gpos[g] != len(groups[g]) for g in GROUPS):
        raise ValueError("unused bytes in a group or permutation stream")
    return head["meta"], out


def _brotli_decompress(data: bytes) -> bytes:
    from pgolf.quant.codecs import _brotli as lib

    try:
        return lib().decompress(data)
    except Exception as exc:  # brotli.error
        raise ValueError(f"corrupt brotli stream ({exc})") from None
