"""Quantisers: grids, clip rules, scale floors, per-row search, and the per-tensor format policy."""

from __future__ import annotations

import pytest
import torch

from pgolf.config import load_config
from pgolf.quant.config import QuantConfig
from pgolf.quant.export import choose_format, dequantize_state_dict, quantize_state_dict, roundtrip_errors
from pgolf.quant.formats import parse_format, quantize_rows, row_quantile


def test_format_grammar() -> None:
    f = parse_format("int6:max:full")
    assert (f.bits, f.clip, f.grid, f.qmin, f.qmax) == (6, "max", "full", -32, 31)
    assert parse_format("int5").spec() == "int5:q:sym" and parse_format("int5").qmin == -15
    assert parse_format("FP16").spec() == "fp16"
    assert parse_format("int8:q:sym:stored").spec() == "int8:q:sym" and parse_format("int8").rounding == "stored"
    f = parse_format("int6:fp32div:max")  # options in any order; only the non-default rounding is spelled out
    assert (f.clip, f.rounding, f.spec()) == ("max", "fp32div", "int6:max:sym:fp32div")
    assert parse_format(f.spec()) == f
    for bad in ("int1", "int9", "int6:foo", "float8", "int", "int8:q:sym:fp16div"):
        with pytest.raises(ValueError):
            parse_format(bad)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("grid", ["sym", "full"])
def test_every_width_stays_on_its_grid_and_round_trips(bits: int, grid: str) -> None:
    fmt = parse_format(f"int{bits}:max:{grid}")
    w = torch.randn(33, 70) * 3
    q, s = quantize_rows(w, fmt)
    assert q.dtype == torch.int8 and s.dtype == torch.float16
    assert int(q.min()) >= fmt.qmin and int(q.max()) <= fmt.qmax
    deq = q.float() * s.float()[:, None]
    step = s.float()[:, None]
    assert ((deq - w).abs() <= step * 0.5 + 1e-6).all()  # row max clip: nothing is clipped


def test_row_quantile_matches_torch_quantile_bit_for_bit() -> None:
    # the submissions' clips are torch.quantile's: q rounded to fp32, an fp32 rank, lerp
    for cols in (1, 2, 17, 300, 512, 1536):
        x = torch.randn(20, cols).abs()
        for q in (0.0, 0.3, 0.5, 0.999, 0.9995, 0.9999, 0.99999, 0.9999984, 1.0):
            assert torch.equal(row_quantile(x, q), torch.quantile(x, q, dim=1)), (cols, q)


def test_scale_floor_and_no_zero_scale() -> None:
    w = torch.full((2, 8), 0.01)
    _, s = quantize_rows(w, parse_format("int6:max:full"))  # floor 1/31
    assert torch.allclose(s.float(), torch.full((2,), 1 / 31), rtol=1e-3)
    _, s = quantize_rows(torch.zeros(3, 4), parse_format("int6:max:full"), scale_floor=0.0)
    assert (s.float() > 0).all()  # the 1e-12 guard would underflow to 0 in fp16
    q, _ = quantize_rows(torch.zeros(3, 4), parse_format("int6:max:full"), scale_floor=0.0)
    assert (q == 0).all()


def test_per_row_search_beats_row_max_row_by_row() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.distributions.StudentT(2.5).sample((64, 512))  # heavy tails: clipping pays
    rows = w.reshape(64, -1)
    errs = {}
    for clip in ("max", "search"):
        q, s = quantize_rows(w, parse_format(f"int6:{clip}:sym"))
        errs[clip] = (q.float() * s.float()[:, None] - rows).square().sum(dim=1)
    assert (errs["search"] <= errs["max"] + 1e-6).all()
    assert (errs["search"] < errs["max"] * 0.99).float().mean() > 0.5  # a real gain on most rows
    del g


def _names(preset: str) -> dict[str, str]:
    cfg = load_config(preset)
    from pgolf.quant.predict import _meta_state

    return {n: choose_format(n, t, cfg.quant) for n, t in _meta_state(cfg).items()}


def test_presets_mixed_precision_policy() -> None:
    f401 = _names("pr401")
    assert f401["blocks.0.attn.c_q.weight"] == f401["blocks.10.mlp.proj.weight"] == "int6:max:full"
    assert f401["tok_emb.weight"] == f401["bigram.embed.weight"] == f401["ve_shared.embed.weight"] == "int8:q:sym:fp32div"
    assert f401["bigram.proj.weight"] == f401["ve_shared.proj.weight"] == "fp16"  # <= 65,536 elements
    for control in ("blocks.3.attn_scale", "blocks.3.resid_mix", "blocks.3.attn.q_gain", "skip_weights", "smear.gate", "bigram.scale",
                    "ve_layer_scales.0", "ve_shared.scale"):
        assert f401[control] == "fp32", control  # really fp32 (the submissions stored fp16)
    f89 = _names("pr89")
    assert f89["tok_emb.weight"] == "fp16" and f89["blocks.0.mlp.fc.weight"] == "int6:q:sym:fp32div"


@pytest.mark.parametrize("preset", ["pr1787", "pr1855"])
def test_r6_r7_route_every_small_float_to_fp16(preset: str) -> None:
    """R6/R7's routing (frontier.md 3.12): quant-gates -> int8 rows, then every float tensor of at
    most 65,536 values -> fp16 (control tensors too: the records have no fp32 rule), the rest GPTQ."""
    cfg = load_config(preset)
    from pgolf.quant.predict import _meta_state

    state = _meta_state(cfg)
    formats = {n: choose_format(n, t, cfg.quant) for n, t in state.items()}
    controls = [n for n in formats if any(p in n for p in cfg.quant.control_patterns) and not n.endswith("attn_gate_w")]
    assert {"skip_weights", "skip_gates", "parallel_post_lambdas", "blocks.3.attn.q_gain", "blocks.3.resid_mix"} <= set(controls)
    for name, t in state.items():
        if name.endswith(".attn_gate_w"):
            assert formats[name] == "int8:max:sym:nofloor", name
        elif t.is_floating_point() and t.numel() <= 65_536:
            assert formats[name] == "fp16", name
        else:
            assert formats[name].startswith("int"), name


def test_name_patterns_come_first_and_int5_mlp() -> None:
    cfg = QuantConfig(mlp_format="int5:max:full", attn_format="int6:max:full", name_formats=["blocks.8.attn.c_k=fp16"])
    w = torch.randn(256, 512)
    assert choose_format("blocks.8.attn.c_k.weight", w, cfg) == "fp16"
    assert choose_format("blocks.7.attn.c_k.weight", w, cfg) == "int6:max:full"
    assert choose_format("blocks.7.mlp.fc.weight", w, cfg) == "int5:max:full"
    assert choose_format("blocks.7.mlp.fc.step", torch.arange(3), cfg) == "raw"


def test_state_dict_round_trip_keeps_dtypes_and_reports_errors() -> None:
    sd = {"blocks.0.mlp.fc.weight": torch.randn(64, 32), "tok_emb.weight": torch.randn(16, 8).bfloat16(), "q_gain": torch.rand(4),
          "count": torch.tensor([3, 4])}
    cfg = QuantConfig(mlp_format="int6:max:full", small_numel=100)
    qts = quantize_state_dict(sd, cfg)
    back = dequantize_state_dict(qts)
    assert all(back[k].dtype == v.dtype and back[k].shape == v.shape for k, v in sd.items())
    assert torch.equal(back["q_gain"], sd["q_gain"]) and torch.equal(back["count"], sd["count"])
    errs = roundtrip_errors(sd, qts)
    assert "count" not in errs and 0 < errs["blocks.0.mlp.fc.weight"]["rel_rms"] < 0.05
