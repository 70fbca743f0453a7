"""LQER: the rank-r correction is the SVD optimum, its packed factors sit on the int2/int4 grids,
it is stored as typed container streams, applied at load, and a corrupted stream is an error."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch

from pgolf.errors import ArtifactError, ConfigError
from pgolf.quant.codecs import CODEC_IDS, decompress
from pgolf.quant.config import QuantConfig
from pgolf.quant.container import ChunkPlan, decode_artifact, encode_artifact
from pgolf.quant.export import dequantize_state_dict, dequantize_tensor, quantize_state_dict
from pgolf.quant.formats import dequantize_rows
from pgolf.quant.lqer import lqer_for, pack_factors, svd_factors


def _err(rows: int = 96, cols: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(rows, 3, generator=g) @ torch.randn(3, cols, generator=g) * 0.01  # a strong low-rank part
    return low + torch.randn(rows, cols, generator=g) * 0.002


@pytest.mark.parametrize("rank", [1, 4, 7])
def test_factors_are_the_rank_r_optimum(rank: int) -> None:
    e = _err()
    a, b = svd_factors(e, rank)
    assert a.shape == (96, rank) and b.shape == (rank, 128)
    sv = torch.linalg.svdvals(e.double())
    residual = (e.double() - a.double() @ b.double()).square().sum()
    assert torch.allclose(residual, sv[rank:].square().sum(), rtol=1e-4)  # Eckart-Young: nothing of rank r does better
    other = torch.randn(96, rank, dtype=torch.float64) @ torch.randn(rank, 128, dtype=torch.float64) * 1e-3
    assert (e.double() - a.double() @ b.double() - other).square().sum() > residual


def test_asym_packing_is_on_the_int2_int4_grids() -> None:
    a, b = svd_factors(_err(), 4)
    lq = pack_factors(a, b, "asym", 64, 4)
    assert lq.mode == "asym" and lq.sa.numel() == 1 and lq.sb.numel() == 4 * 128 // 64
    assert lq.qa.min() >= -2 and lq.qa.max() <= 1 and lq.qb.min() >= -8 and lq.qb.max() <= 7
    assert torch.equal(lq.sa, (a.abs().max() / 1.5).half().reshape(1))
    groups = b.reshape(-1, 64)
    assert torch.equal(lq.sb, (groups.abs().amax(dim=1) / 7.5).half())
    qa = torch.clamp(torch.round(a / lq.sa.float()), -2, 1)
    assert torch.equal(lq.qa.float(), qa)
    fa, fb = lq.factors()
    # B: every value within half a step of its group's scale (the group max sits at 7.5 steps and
    # is clamped to 7: exactly half a step, up to the fp16 rounding of the scale)
    step = lq.sb.float().repeat_interleave(64).reshape(b.shape)
    assert ((fb - b).abs() <= step * 0.5 * (1 + 2e-3)).all()
    # the correction removes part of the error even at 2 bits for A
    e = _err()
    assert (e - fa @ fb).norm() < e.norm()


def test_sym_fallback_when_the_group_does_not_divide() -> None:
    a, b = svd_factors(_err(cols=100), 4)  # 4 x 100 = 400, not a multiple of 64
    lq = pack_factors(a, b, "asym", 64, 4)
    assert lq.mode == "sym" and lq.param == 4 and lq.sa.numel() == 96 and lq.sb.numel() == 4
    assert lq.qa.abs().max() <= 7 and lq.qb.abs().max() <= 7
    assert torch.equal(lq.sa, (a.abs().amax(dim=1) / 7).half())
    assert lqer_for(_err(), 4, "sym", 64, 3).qa.abs().max() <= 3


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        "blocks.0.mlp.fc.weight": torch.randn(128, 64, generator=g) * 0.05,
        "blocks.0.attn.c_q.weight": torch.randn(64, 64, generator=g) * 0.01,
        "tok_emb.weight": torch.randn(96, 64, generator=g) * 0.08,
        "blocks.0.attn_scale": torch.ones(64),
    }


def _cfg(**kw) -> QuantConfig:
    return QuantConfig(mlp_format="int4:sd:sym", attn_format="int4:sd:sym", embed_format="int5:sd:sym", small_numel=64,
                       lqer_top_k=2, lqer_rank=4, **kw)


def test_top_k_by_error_norm_and_applied_at_load() -> None:
    state = _state()
    qts = quantize_state_dict(state, _cfg())
    with_lqer = {q.name for q in qts if q.lqer is not None}
    norms = {}
    for q in qts:
        if q.scale is not None:
            norms[q.name] = (state[q.name] - dequantize_rows(q.values, q.scale, q.shape, torch.float32)).norm()
    assert with_lqer == set(sorted(norms, key=norms.get)[-2:])  # the two largest ||W - W_hat||_F
    for q in qts:
        if q.lqer is not None:
            plain = dequantize_rows(q.values, q.scale, q.shape, torch.float32)
            assert torch.allclose(dequantize_tensor(q), plain + q.lqer.correction())
            assert (state[q.name] - dequantize_tensor(q)).norm() < (state[q.name] - plain).norm()


@pytest.mark.parametrize("packing", ["bitpack", "entropy", "auto"])
@pytest.mark.parametrize("mode", ["asym", "sym"])
def test_lqer_streams_round_trip(packing: str, mode: str) -> None:
    qts = quantize_state_dict(_state(), _cfg(lqer_mode=mode))
    blob = encode_artifact(qts, {}, ChunkPlan(default_codec="auto" if packing == "auto" else "zstd-22", packing=packing))
    back = decode_artifact(blob).qtensors
    a, b = dequantize_state_dict(qts), dequantize_state_dict(back)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for x, y in zip(qts, back):
        assert (x.lqer is None) == (y.lqer is None)
        if x.lqer is not None:
            assert x.lqer.mode == y.lqer.mode == mode and torch.equal(x.lqer.qa, y.lqer.qa) and torch.equal(x.lqer.sb, y.lqer.sb)


def _edit_header(blob: bytes, edit) -> bytes:
    fmt = "<8sHBII"
    magic, version, codec_id, hlen, hraw = struct.unpack_from(fmt, blob, 0)
    start = struct.calcsize(fmt)
    header = json.loads(decompress({v: k for k, v in CODEC_IDS.items()}[codec_id], blob[start : start + hlen], hraw))
    edit(header)
    raw = json.dumps(header).encode()
    new = zlib.compress(raw, 9)
    body = struct.pack(fmt, magic, version, CODEC_IDS["zlib-9"], len(new), len(raw)) + new + blob[start + hlen : -4]
    return body + struct.pack("<I", zlib.crc32(body))


def _lqer_entry(header: dict) -> list:
    return next(t for t in header["tensors"] if len(t) == 6)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.__setitem__(5, ["lowrank", 4, 64]), "unknown LQER mode"),
    (lambda t: t.__setitem__(5, ["asym", 5, 64]), "needs|holds|shape|bytes"),  # rank that does not match the payload
    (lambda t: t.__setitem__(5, ["asym", 4, 48]), "group|scales"),
    (lambda t: t.__setitem__(4, [s for s in t[4] if s[0] != "lbs"]), "without its 'lbs'"),
    (lambda t: t.__setitem__(4, t[4] + [t[4][0][:1] + t[4][0][1:]]), "unexpected stream"),
    (lambda t: t[4][[s[0] for s in t[4]].index("la")].__setitem__(5, "raw"), "packing"),
])
def test_corrupted_lqer_entries_are_clear_errors(edit, message: str) -> None:
    qts = quantize_state_dict(_state(), _cfg())
    blob = encode_artifact(qts, {}, ChunkPlan(default_codec="zstd-22", packing="bitpack"))
    with pytest.raises(ArtifactError, match=message):
        decode_artifact(_edit_header(blob, lambda h: edit(_lqer_entry(h))), "bad.pgolf")


def test_lqer_on_a_float_tensor_is_rejected() -> None:
    qts = quantize_state_dict(_state(), _cfg())
    blob = encode_artifact(qts, {}, ChunkPlan(default_codec="zstd-22", packing="bitpack"))

    def move(h):
        entry = _lqer_entry(h)
        plain = next(t for t in h["tensors"] if t[3] == "fp32")
        plain.append(entry.pop())
        h["tensors"].sort(key=lambda t: t[3] != "fp32")  # the float tensor is parsed first

    with pytest.raises(ArtifactError, match="2-D integer tensor"):
        decode_artifact(_edit_header(blob, move), "bad.pgolf")


def test_lqer_config_is_validated() -> None:
    for kw in ({"lqer_mode": "both"}, {"lqer_rank": 0}, {"lqer_top_k": -1}, {"lqer_factor_bits": 9}):
        with pytest.raises(ConfigError, match="lqer"):
            QuantConfig(**kw).validate()
