"""The artifact container: exact round trips for every scheme and dtype, rejection of malicious or
broken files (nothing executed), and no compressor fallback."""

from __future__ import annotations

import io
import json
import pickle
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch

from pgolf.errors import ArtifactError, MissingDependencyError
from pgolf.quant.codecs import compress, require_codec
from pgolf.quant.config import QuantConfig
from pgolf.quant.container import CONTAINER_VERSION, ChunkPlan, decode_artifact, encode_artifact, read_artifact
from pgolf.quant.export import QTensor, dequantize_state_dict, quantize_state_dict

FORMATS = ["int2:max:full", "int3:q:sym", "int4:search:sym", "int5:max:full", "int6:max:full", "int6:q:sym", "int7:max:sym", "int8:q:sym",
           "fp16", "bf16", "fp32"]


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "m.weight": torch.randn(24, 40, generator=g),
        "v.weight": torch.randn(37, generator=g),  # 1-D: one row
        "s": torch.tensor(0.75),  # 0-d
        "h.weight": torch.randn(5, 3, 4, generator=g).bfloat16(),
        "e.weight": torch.randn(9, 7, generator=g).half(),
    }


def _round_trip(qts: list[QTensor], plan: ChunkPlan) -> tuple[bytes, list[QTensor]]:
    blob = encode_artifact(qts, {"k": [1, "x"]}, plan)
    contents = decode_artifact(blob)
    assert contents.meta == {"k": [1, "x"]}
    return blob, contents.qtensors


def _assert_same(a: list[QTensor], b: list[QTensor]) -> None:
    da, db = dequantize_state_dict(a), dequantize_state_dict(b)
    assert list(da) == list(db)
    for k in da:
        assert da[k].dtype == db[k].dtype and da[k].shape == db[k].shape and torch.equal(da[k], db[k]), k
    for x, y in zip(a, b):
        assert x.fmt == y.fmt and torch.equal(x.values.reshape(-1), y.values.reshape(-1))
        assert (x.scale is None) == (y.scale is None) and (x.scale is None or torch.equal(x.scale, y.scale))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("packing", ["int8", "bitpack", "entropy", "auto"])
def test_every_scheme_round_trips_exactly(fmt: str, packing: str) -> None:
    cfg = QuantConfig(name_formats=[f"weight={fmt}", f"s={fmt}"])
    qts = quantize_state_dict(_state(), cfg)
    _, back = _round_trip(qts, ChunkPlan(default_codec="zstd-22", packing=packing))
    _assert_same(qts, back)


@pytest.mark.parametrize("codec", ["none", "zlib-9", "zstd-22", "lzma", "brotli", "auto"])
def test_every_codec_and_raw_dtype_round_trips(codec: str) -> None:
    raw = {
        "f32": torch.randn(3, 5), "f16": torch.randn(4).half(), "bf16": torch.randn(2, 2).bfloat16(),
        "i64": torch.arange(-3, 7), "i32": torch.tensor([1, -2], dtype=torch.int32), "i16": torch.tensor([7], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8), "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "b1": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
        "big": torch.randn(3000, 3),  # a stream over SOLO_MIN_BYTES: its own chunk under auto
    }
    qts = [QTensor(k, tuple(v.shape), str(v.dtype).removeprefix("torch."), "raw", v.contiguous()) for k, v in raw.items()]
    _, back = _round_trip(qts, ChunkPlan(default_codec=codec))
    _assert_same(qts, back)


def test_packed_values_use_fewer_than_8_bits() -> None:
    cfg = QuantConfig(mlp_format="int5:max:full", small_numel=0)
    qts = quantize_state_dict({"a.mlp.fc.weight": torch.randn(64, 64)}, cfg)
    contents = decode_artifact(encode_artifact(qts, {}, ChunkPlan(default_codec="none", packing="bitpack")))
    assert contents.tensors[0].streams["v"].nbytes == 64 * 64 * 5 // 8
    contents = decode_artifact(encode_artifact(qts, {}, ChunkPlan(default_codec="none", packing="entropy")))
    assert contents.tensors[0].streams["v"].nbytes < 64 * 64 * 5 // 8


# ---- malformed and malicious files ----------------------------------------------------------------


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(_Boom.target),))


def _good_blob() -> bytes:
    qts = quantize_state_dict({"a.mlp.fc.weight": torch.randn(16, 16), "q_gain": torch.ones(4)}, QuantConfig(small_numel=8))
    return encode_artifact(qts, {"x": 1}, ChunkPlan(default_codec="zstd-22", packing="bitpack"))


def _reseal(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _with_header(blob: bytes, edit) -> bytes:
    """Rewrite the JSON header with ``edit(header)`` and a valid checksum: only the content checks
    can catch what the edit broke."""
    magic, version, codec_id, hlen, hraw = struct.unpack_from("<8sHBII", blob, 0)
    start = struct.calcsize("<8sHBII")
    from pgolf.quant.codecs import CODEC_IDS, decompress

    codec = {v: k for k, v in CODEC_IDS.items()}[codec_id]
    header = json.loads(decompress(codec, blob[start : start + hlen], hraw))
    edit(header)
    raw = json.dumps(header).encode()
    new = zlib.compress(raw, 9)
    body = struct.pack("<8sHBII", magic, version, CODEC_IDS["zlib-9"], len(new), len(raw)) + new + blob[start + hlen : -4]
    return _reseal(body)


def test_pickle_payloads_are_rejected_and_never_executed(tmp_path: Path) -> None:
    _Boom.target = str(tmp_path / "pwned")
    evil_pickle = pickle.dumps(_Boom())
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    evil_zstd = compress("zstd-22", buf.getvalue())
    for blob, what in ((evil_pickle, "pickle"), (buf.getvalue(), "torch.save"), (evil_zstd, "zstd")):
        path = tmp_path / "evil.pgolf"
        path.write_bytes(blob)
        with pytest.raises(ArtifactError, match=f"{path}.*{what}"):
            read_artifact(path)
    assert not (tmp_path / "pwned").exists()


def test_truncated_and_corrupted_files_are_rejected(tmp_path: Path) -> None:
    blob = _good_blob()
    assert decode_artifact(blob)  # the untouched file is fine
    cases = {
        "truncated": blob[: len(blob) // 2],
        "short": blob[:10],
        "flipped byte": blob[:40] + bytes([blob[40] ^ 1]) + blob[41:],
        "bad checksum": blob[:-4] + b"\x00\x00\x00\x00",
        "trailing bytes": _reseal(blob[:-4] + b"junk"),
    }
    for why, bad in cases.items():
        with pytest.raises(ArtifactError, match="checksum|too short|unexpected bytes"):
            decode_artifact(bad, "x.pgolf")


def test_old_versions_are_rejected_with_a_clear_message() -> None:
    blob = bytearray(_good_blob())
    blob[8:10] = struct.pack("<H", 1)
    with pytest.raises(ArtifactError, match="unsupported artifact version 1 .*reads versions 2, 3"):
        decode_artifact(_reseal(bytes(blob[:-4])), "old.pgolf")


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["tensors"][0].__setitem__(1, [17, 16]), "needs|holds|bytes"),  # shape that does not match its payload
    (lambda h: h["tensors"][0][4][0].__setitem__(5, "gzip"), "packing"),
    (lambda h: h["tensors"][0][4][0].__setitem__(3, 10**9), "outside its chunk"),
    (lambda h: h["tensors"][0].__setitem__(3, "int9"), "unknown format"),
    (lambda h: h["tensors"][0].__setitem__(2, "complex128"), "unknown dtype"),
    (lambda h: h["tensors"][0][4].pop(), "missing scale"),
    (lambda h: h["tensors"].append(h["tensors"][0]), "twice"),
    (lambda h: h["chunks"][0].__setitem__(0, "gzip"), "unknown codec"),
    (lambda h: h.pop("meta"), "malformed header"),
    (lambda h: h["tensors"][0].__setitem__(1, [-1, 16]), "shape"),
])
def test_inconsistent_headers_are_rejected(edit, message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        decode_artifact(_with_header(_good_blob(), edit), "bad.pgolf")


# ---- no silent fallback ----------------------------------------------------------------------------


def test_missing_zstandard_is_an_error_not_a_fallback(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard now raises ImportError
    qts = quantize_state_dict({"w": torch.randn(4, 4)}, QuantConfig())
    for codec in ("zstd-22", "auto"):
        with pytest.raises(MissingDependencyError, match="zstandard.*refusing to fall back"):
            encode_artifact(qts, {}, ChunkPlan(default_codec=codec))
        with pytest.raises(MissingDependencyError, match="zstandard"):
            require_codec(codec)
    require_codec("zlib-9")  # others still work


def test_missing_zstandard_fails_a_run_at_start(monkeypatch) -> None:
    from pgolf.config import load_config
    from pgolf.quant.predict import preflight

    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(MissingDependencyError, match="zstandard"):
        preflight(load_config("pr401", "cpu"), 0, print)


@pytest.mark.parametrize("codec, packing", [("zstd-22", "entropy"), ("lzma", "bitpack"), ("brotli", "int8")])
def test_random_corruption_with_a_valid_checksum_never_escapes_as_another_error(codec: str, packing: str) -> None:
    """Byte flips and truncations, re-sealed with a correct CRC: every outcome is either a clean
    decode (the flip hit a value byte) or an ArtifactError, never a crash of a parser or decoder."""
    import random

    qts = quantize_state_dict({"a.mlp.fc.weight": torch.randn(48, 40), "b.mlp.fc.weight": torch.randn(16, 24) * 0.01, "q_gain": torch.ones(4)},
                              QuantConfig(mlp_format="int6:max:full", small_numel=8))
    blob = encode_artifact(qts, {"x": 1}, ChunkPlan(default_codec=codec, packing=packing))
    rng = random.Random(0)
    for _ in range(300):
        b = bytearray(blob[:-4])
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(19, len(b))] = rng.randrange(256)
        if rng.random() < 0.2:
            b = b[: rng.randrange(19, len(b))]
        try:
            decode_artifact(_reseal(bytes(b)), "fuzz.pgolf")
        except ArtifactError as exc:
            assert str(exc).startswith("fuzz.pgolf: ")
