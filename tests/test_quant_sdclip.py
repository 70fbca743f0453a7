"""SDClip scales (k * std / c, k by group, Hessian-aware lambda), the quant-gate rule, GPTQ of the
embedding with the final norm's Hessian, looped layers, the calibration size in batches."""

from __future__ import annotations

import pytest
import torch

from pgolf.config import load_config
from pgolf.errors import ConfigError
from pgolf.model.gpt import build_model
from pgolf.quant.calib import SelfGenerated, calibration_seqs
from pgolf.quant.config import QuantConfig
from pgolf.quant.export import choose_format, quantize_state_dict, quantize_tensor, sdclip_group
from pgolf.quant.formats import parse_format, quantize_rows
from pgolf.quant.gptq import collect_hessians, gptq_quantize, hessian_row_gain


def test_sdclip_scale_is_k_std_over_c() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.linspace(0.005, 0.05, 64)[:, None]
    for bits, k in ((6, 12.85), (7, 14.0), (8, 20.0), (5, 11.5)):
        fmt = parse_format(f"int{bits}:sd:sym")
        q, s = quantize_rows(w, fmt, sd_k=k)
        c = 2 ** (bits - 1) - 1
        want = (k * w.std(dim=1, unbiased=True) / c).half()  # fp16, as stored
        assert torch.equal(s, want)
        assert int(q.abs().max()) <= c
        # the grid is exact rounding against the stored scale, clamped to +-c
        ref = torch.clamp(torch.round(w / s.float()[:, None]), -c, c).to(torch.int8)
        assert torch.equal(q, ref)
    # the floor is the records' 1e-10, not quant.scale_floor (1/qmax), and std is of the row
    tiny = torch.randn(4, 32, generator=g) * 1e-4
    _, s = quantize_rows(tiny, parse_format("int6:sd:sym"), sd_k=12.85, scale_floor=-1.0)
    assert torch.allclose(s.float(), (12.85 * tiny.std(dim=1) / 31).half().float())
    with pytest.raises(ValueError, match="needs k"):
        quantize_rows(w, parse_format("int6:sd:sym"))


def test_sdclip_k_is_chosen_by_group_name() -> None:
    assert [sdclip_group(n) for n in ("tok_emb.weight", "blocks.3.mlp.fc.weight", "blocks.0.attn.c_q.weight", "bigram.proj.weight")] == [
        "embed", "mlp", "attn", "other"]
    cfg = QuantConfig(mlp_format="int6:sd:sym", attn_format="int6:sd:sym", embed_format="int7:sd:sym", other_format="int6:sd:sym",
                      sdclip_k_mlp=11.5, sdclip_k_attn=13.0, sdclip_k_embed=14.0, sdclip_k_other=9.0, small_numel=16)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    for name, k, c in (("blocks.1.mlp.proj.weight", 11.5, 31), ("blocks.1.attn.proj.weight", 13.0, 31), ("tok_emb.weight", 14.0, 63),
                       ("bigram.proj.weight", 9.0, 31)):
        qt = quantize_tensor(name, w, choose_format(name, w, cfg), cfg)
        assert torch.equal(qt.scale, (k * w.std(dim=1) / c).half()), name


def test_hessian_aware_sdclip_row_factor() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 32, generator=g)
    d = torch.rand(32, generator=g) + 0.1
    H = torch.diag(d)
    gain = hessian_row_gain(w, H, 0.175)
    col_imp = d / d.mean()
    row_imp = (w.abs() * col_imp).mean(dim=1)
    row_imp = row_imp / row_imp.mean()
    assert torch.allclose(gain, 1 + 0.175 * (row_imp - 1), atol=1e-6)
    cfg = QuantConfig(sdclip_hessian_lambda=0.175)
    _, s = gptq_quantize(w, H, parse_format("int6:sd:sym"), cfg, sd_k=12.85)
    assert torch.equal(s, (12.85 * w.std(dim=1) * gain / 31).half())
    _, s0 = gptq_quantize(w, H, parse_format("int6:sd:sym"), QuantConfig(), sd_k=12.85)
    assert torch.equal(s0, (12.85 * w.std(dim=1) / 31).half())  # lambda 0: plain SDClip


def test_gptq_with_sdclip_lowers_the_hessian_weighted_error() -> None:
    g = torch.Generator().manual_seed(3)
    cols, rows, n = 128, 64, 4096
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols) * 0.3
    x = torch.randn(n, cols, generator=g) @ mix * torch.linspace(0.2, 3.0, cols)
    w = torch.randn(rows, cols, generator=g) * 0.02
    H = x.T @ x / n
    fmt = parse_format("int6:sd:sym")
    q_rtn, s_rtn = quantize_rows(w, fmt, sd_k=12.85)
    q_g, s_g = gptq_quantize(w, H, fmt, QuantConfig(), sd_k=12.85)
    assert torch.equal(s_rtn, s_g)

    def herr(q, s):
        e = w - q.float() * s.float()[:, None]
        return torch.einsum("ri,ij,rj->", e, H, e)

    assert herr(q_g, s_g) < 0.7 * herr(q_rtn, s_rtn)


def test_quant_gate_rows_come_before_control_and_passthrough() -> None:
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(4)) * 0.3
    off = QuantConfig()
    assert choose_format("blocks.2.attn.attn_gate_w", w, off) == "fp32"  # a control tensor
    on = QuantConfig(gate_format="int8:max:sym:nofloor")
    assert choose_format("blocks.2.attn.attn_gate_w", w, on) == "int8:max:sym:nofloor"
    assert choose_format("blocks.2.attn.attn_gate_w", torch.zeros(2, 8), on) == "fp32"  # < 32 elements
    assert choose_format("blocks.2.attn.attn_gate_w", torch.zeros(8, 1025 + 4096), on) == "fp32"  # > 8192
    assert choose_format("blocks.2.attn.attn_gate_proj.weight", w, on) == "fp32"  # not the gate name
    qt = quantize_tensor("blocks.2.attn.attn_gate_w", w, on.gate_format, on)
    s = (w.abs().amax(dim=1).clamp_min(1e-10) / 127).half()
    assert torch.equal(qt.scale, s)
    assert torch.equal(qt.values, torch.clamp(torch.round(w / s.float()[:, None]), -127, 127).to(torch.int8))
    zero = quantize_tensor("blocks.2.attn.attn_gate_w", torch.zeros(8, 12), on.gate_format, on)
    assert (zero.scale.float() > 0).all() and (zero.values == 0).all()  # zero-init gates: floor, not 1/127
    with pytest.raises(ConfigError, match="gate_format"):
        QuantConfig(gate_format="fp16").validate()


def _tiny(preset: str = "pr1855", **extra):
    over = [("model.num_layers", 4), ("model.loop_start", 1), ("model.loop_end", 2), ("model.parallel_start", 3),
            ("model.vocab_size", 64), ("model.xsa_last_n", 4), ("quant.small_numel", 256), ("quant.gptq_embed", True)]
    cfg = load_config(preset, "cpu", over + list(extra.items()))
    torch.manual_seed(0)
    return cfg, build_model(cfg.model)


def test_embedding_hessian_is_the_final_norm_output() -> None:
    cfg, model = _tiny()
    model.train()
    src = SelfGenerated(model, num_seqs=3, seq_len=10, seed=1)
    hs = collect_hessians(model, src, cfg.quant)
    assert model.training and model.looping_active  # restored
    ids = torch.cat(list(src.batches(torch.device("cpu"))))
    with torch.no_grad():
        model.eval()
        model.set_looping(True)
        hidden = model.forward_hidden(ids).reshape(-1, cfg.model.model_dim).float()
    want = hidden.T @ hidden / hidden.shape[0]
    assert torch.allclose(hs["tok_emb.weight"], want, rtol=1e-4, atol=1e-6)
    # and the embedding is then quantised by GPTQ (not rounding) on its int format
    qts = {q.name: q for q in quantize_state_dict(dict(model.state_dict()), cfg.quant, hs)}
    rtn = quantize_tensor("tok_emb.weight", model.tok_emb.weight, choose_format("tok_emb.weight", model.tok_emb.weight, cfg.quant), cfg.quant)
    assert not torch.equal(qts["tok_emb.weight"].values, rtn.values)


def test_looped_layers_add_one_contribution_per_pass() -> None:
    cfg, model = _tiny()
    counts: dict[str, int] = {}
    for n, m in model.named_modules():
        if n.endswith("mlp.fc"):
            m.register_forward_pre_hook(lambda mod, args, n=n: counts.__setitem__(n, counts.get(n, 0) + 1))
    model.set_looping(False)  # as in training before loop_enable_at: calibration still loops (eval does)
    src = SelfGenerated(model, num_seqs=2, seq_len=6, seed=2, batch_seqs=2)
    hs = collect_hessians(model, src, cfg.quant)
    # every forward (sampling included) runs the virtual layers [0, (1, 2) x 3, 3]
    assert counts["blocks.1.mlp.fc"] == 3 * counts["blocks.0.mlp.fc"] == 3 * counts["blocks.3.mlp.fc"] > 0
    assert not model.looping_active
    # a looped block's Hessian averages over its three passes: 3x the token count of block 0
    ids = torch.cat(list(src.batches(torch.device("cpu"))))
    xs = []
    h = model.blocks[1].mlp.fc.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]).float()))
    with torch.no_grad():
        model.eval()
        model.set_looping(True)
        model.forward_hidden(ids)
    h.remove()
    x = torch.cat(xs)
    assert x.shape[0] == 3 * ids.numel()
    assert torch.allclose(hs["blocks.1.mlp.fc.weight"], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)


def test_calibration_batches_are_record_micro_batches() -> None:
    cfg = load_config("pr1855", None, [("quant.gptq_calib_batches", 16)])
    assert calibration_seqs(cfg) == 16 * 48  # 16 batches of 48 x 2048 per rank, R6/R7
    cpu = load_config("pr1855", "cpu", [("quant.gptq_calib_batches", 16)])
    assert calibration_seqs(cpu) == 16 * 4096 // 256
    assert calibration_seqs(load_config("pr401", "cpu")) == 64  # 0 batches: gptq_calib_seqs
