"""The two rounding rules of an integer format, checked against the challenge scripts' own
quantisers (re-implemented here from their code, independently of pgolf):

* ``fp32div``: q = round(clip(w) / s_fp32), s stored fp16 afterwards: the baseline's int8
  (``quantize_float_tensor``), PR #89's int6 and PR #201/#401's int8 tensors;
* ``stored`` (default): q = round(w / s_fp16), the scale cast to fp16 before dividing: PR #162/#198/
  #201/#401's int6 (``quantize_int6_per_row``), and the rule with the lower round-trip error.

Dequantisation is q * s_fp16 under both.
"""

from __future__ import annotations

import pytest
import torch

from pgolf.config import load_config
from pgolf.errors import ConfigError
from pgolf.quant.config import QuantConfig
from pgolf.quant.export import choose_format, dequantize_tensor, quantize_state_dict, quantize_tensor
from pgolf.quant.formats import as_rows, parse_format, quantize_rows
from pgolf.quant.qat import FakeQuantizer

CLIP_Q = 0.9999984


# ---- the scripts' quantisers, as written in their train_gpt.py (2-D per-row paths) ----

def script_int8(t: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Baseline ``quantize_float_tensor`` (also #201/#401's int8; #89's int6 with qmax=31)."""
    t32 = t.float()
    clip_abs = torch.quantile(t32.abs(), CLIP_Q, dim=1)
    clipped = torch.maximum(torch.minimum(t32, clip_abs[:, None]), -clip_abs[:, None])
    scale = (clip_abs / float(qmax)).clamp_min(1.0 / float(qmax))
    q = torch.clamp(torch.round(clipped / scale[:, None]), -qmax, qmax).to(torch.int8).contiguous()
    return q, scale.to(dtype=torch.float16).contiguous()


def script_int6_pr89(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return script_int8(t, qmax=31)


def script_int6_pr162(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PR #162/#198/#201/#401 ``quantize_int6_per_row``: fp16 scale *before* dividing, row max."""
    t32 = t.float()
    row_max = t32.abs().amax(dim=1)
    scale = (row_max / 31.0).clamp_min(1.0 / 31.0).to(torch.float16)
    q = torch.clamp(torch.round(t32 / scale.float()[:, None]), -32, 31).to(torch.int8)
    return q, scale


def _weights(rows: int = 128, cols: int = 1024, seed: int = 0) -> torch.Tensor:
    """Gaussian rows above the scale floor, rows under it (fixed 1/qmax scale: the int8 tables of
    trained models) and heavy-tailed rows: every regime in which the two rules can part."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[rows // 4 : rows // 2] *= 0.02  # under the floor
    t = torch.distributions.StudentT(3.0).sample((rows // 4, cols))
    w[rows // 2 : 3 * rows // 4] = t * 0.3
    return w


def test_fp32div_is_the_scripts_int8_and_pr89_int6_and_differs_from_stored() -> None:
    w = _weights()
    for spec, ref in (("int8:q:sym:fp32div", script_int8), ("int6:q:sym:fp32div", script_int6_pr89)):
        q_ref, s_ref = ref(w)
        q, s = quantize_rows(w, parse_format(spec))
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref), spec
        q_stored, s_stored = quantize_rows(w, parse_format(spec.replace(":fp32div", "")))
        assert torch.equal(s_stored, s_ref)  # same stored scales ...
        assert (q_stored != q_ref).sum() > 0, spec  # ... but the rules do part on these matrices


def test_stored_is_pr162_int6_and_differs_from_fp32div() -> None:
    w = _weights(seed=1)
    q_ref, s_ref = script_int6_pr162(w)
    q, s = quantize_rows(w, parse_format("int6:max:full"))
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    q_div, _ = quantize_rows(w, parse_format("int6:max:full:fp32div"))
    assert (q_div != q_ref).sum() > 0


@pytest.mark.parametrize("spec", ["int8:q:sym", "int6:q:sym", "int6:max:full", "int5:search:sym"])
def test_stored_rule_is_never_worse(spec: str) -> None:
    """Both rules store the same scale s16 and dequantise q * s16; ``stored`` takes the nearest
    grid point of every unclipped value, so its squared error is no larger, value by value (the
    measured difference on the default matrices: fp32div +0.0001% to +0.05% MSE)."""
    w = _weights(seed=2)
    rows = as_rows(w)
    errs = {}
    for rule in ("stored", "fp32div"):
        q, s = quantize_rows(w, parse_format(f"{spec}:{rule}"))
        errs[rule] = (q.float() * s.float()[:, None] - rows).square()
    assert (errs["stored"] <= errs["fp32div"]).all()
    assert errs["stored"].mean() < errs["fp32div"].mean()


# ---- presets ----

PRESET_RULE = {  # preset -> {bits: rounding} of the script it reproduces
    "baseline": {8: "fp32div"},
    "pr89": {6: "fp32div"},
    "pr201": {8: "fp32div", 6: "stored"},
    "pr401": {8: "fp32div", 6: "stored"},
}


@pytest.mark.parametrize("preset", sorted(PRESET_RULE))
def test_every_integer_tensor_of_a_preset_uses_its_scripts_rounding(preset: str) -> None:
    from pgolf.quant.predict import _meta_state

    cfg = load_config(preset)
    seen = set()
    for name, t in _meta_state(cfg).items():
        fmt = parse_format(choose_format(name, t, cfg.quant)) if t.is_floating_point() else None
        if fmt is None or fmt.kind != "int":
            continue
        assert fmt.bits in PRESET_RULE[preset], (name, fmt.spec())
        assert fmt.rounding == PRESET_RULE[preset][fmt.bits], (name, fmt.spec())
        seen.add(fmt.bits)
    assert seen == set(PRESET_RULE[preset])


@pytest.mark.parametrize(
    "preset, name, ref",
    [("baseline", "tok_emb.weight", script_int8), ("baseline", "blocks.0.mlp.fc.weight", script_int8),
     ("pr89", "blocks.0.attn.c_q.weight", script_int6_pr89), ("pr89", "blocks.0.mlp.proj.weight", script_int6_pr89),
     ("pr201", "tok_emb.weight", script_int8), ("pr201", "bigram.embed.weight", script_int8),
     ("pr201", "blocks.0.mlp.fc.weight", script_int6_pr162), ("pr401", "ve_shared.embed.weight", script_int8),
     ("pr401", "tok_emb.weight", script_int8), ("pr401", "blocks.3.attn.c_k.weight", script_int6_pr162)],
)
def test_preset_export_equals_the_scripts_quantiser(preset: str, name: str, ref) -> None:
    cfg = load_config(preset).quant
    w = _weights(seed=3)  # 131,072 elements: above the 65,536 passthrough limit
    (qt,) = quantize_state_dict({name: w}, cfg)
    q_ref, s_ref = ref(w)
    assert torch.equal(qt.values, q_ref) and torch.equal(qt.scale, s_ref), (preset, name, qt.fmt)
    assert torch.equal(dequantize_tensor(qt), q_ref.float() * s_ref.float()[:, None])


def test_fp32div_spec_is_recorded_and_the_artifact_round_trips() -> None:
    from pgolf.quant.container import ChunkPlan, decode_artifact, encode_artifact

    cfg = QuantConfig(embed_format="int8:q:sym:fp32div", mlp_format="int6:max:full", small_numel=0)
    qts = quantize_state_dict({"tok_emb.weight": _weights(rows=32, cols=64), "blocks.0.mlp.fc.weight": _weights(rows=32, cols=64)}, cfg)
    assert [qt.fmt for qt in qts] == ["int8:q:sym:fp32div", "int6:max:full"]
    back = decode_artifact(encode_artifact(qts, {}, ChunkPlan(default_codec="zlib-9", packing="auto"))).qtensors
    for a, b in zip(qts, back):
        assert a.fmt == b.fmt and torch.equal(a.values, b.values) and torch.equal(a.scale, b.scale)


# ---- QAT follows the export's rule ----

@pytest.mark.parametrize("spec", ["int8:q:sym:fp32div", "int6:q:sym:fp32div", "int6:max:full"])
def test_fake_quantizer_equals_the_export_under_both_rules(spec: str) -> None:
    cfg = QuantConfig()
    w = torch.nn.Parameter(_weights(rows=64, cols=512, seed=4))
    fq = FakeQuantizer(parse_format(spec), cfg, enabled=True, master=w)
    exported = dequantize_tensor(quantize_tensor("blocks.0.mlp.fc.weight", w, spec, cfg))
    assert torch.equal(fq(w.detach()), exported)
    other = spec.replace(":fp32div", "") if "fp32div" in spec else spec + ":fp32div"
    fq_other = FakeQuantizer(parse_format(other), cfg, enabled=True, master=w)
    assert not torch.equal(fq_other(w.detach()), exported)  # the rule really reaches QAT


@pytest.mark.slow  # inductor compile: ~10 s idle, up to a minute on a shared 2-core machine
def test_compiled_fake_quantizer_keeps_the_fp32div_grid() -> None:
    cfg = QuantConfig()
    w = torch.nn.Parameter(_weights(rows=64, cols=512, seed=5))
    fq = FakeQuantizer(parse_format("int8:q:sym:fp32div"), cfg, enabled=True, master=w)
    compiled = torch.compile(fq, fullgraph=True)
    assert torch.equal(compiled(w.detach()), fq(w.detach()))
    q_ref, s_ref = script_int8(w.detach())
    assert torch.equal(fq(w.detach()), q_ref.float() * s_ref.float()[:, None])


# ---- configuration ----

@pytest.mark.parametrize("key", ["embed_format", "attn_format", "mlp_format", "other_format"])
def test_rounding_option_in_config(key: str) -> None:
    cfg = load_config("pr401", None, [(f"quant.{key}", "int6:max:full:fp32div")])
    assert getattr(cfg.quant, key) == "int6:max:full:fp32div"
    with pytest.raises(ConfigError) as exc:
        load_config("pr401", None, [(f"quant.{key}", "int6:max:full:fp16div")])
    msg = str(exc.value)
    assert "\n" not in msg and f"quant.{key}" in msg and "'fp16div'" in msg and "stored|fp32div" in msg


def test_rounding_option_in_name_formats() -> None:
    QuantConfig(name_formats=["tok_emb=int8:q:sym:fp32div", "c_k=int6:stored"]).validate()
    with pytest.raises(ConfigError) as exc:
        QuantConfig(name_formats=["tok_emb=int8:q:sym:fp32"]).validate()
    msg = str(exc.value)
    assert "\n" not in msg and "quant.name_formats" in msg and "'fp32'" in msg
