"""QAT: the fake quantiser is the export's grid bit for bit, straight-through, and late QAT really
switches on under torch.compile."""

from __future__ import annotations

import time

import pytest
import torch

from pgolf.config import load_config
from pgolf.model.gpt import build_model
from pgolf.model.layers import CastedLinear
from pgolf.quant.export import choose_format, dequantize_tensor, quantize_tensor
from pgolf.quant.qat import attach_qat

TINY = [("model.num_layers", 2), ("model.model_dim", 64), ("model.num_heads", 4), ("model.num_kv_heads", 2), ("model.xsa_last_n", 1),
        ("model.bigram_dim", 32), ("model.ve_dim", 32), ("quant.small_numel", 1024)]


def _model(preset: str, qat: str, extra=()):
    cfg = load_config(preset, "cpu", TINY + [("quant.qat", qat), *extra])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # move away from the (partly zero) init so every row quantises non-trivially
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return cfg, model


@pytest.mark.parametrize("preset, extra", [("pr401", ()), ("pr89", ()), ("pr401", [("quant.mlp_format", "int5:search:sym"), ("quant.scale_floor", 0.0)])])
def test_fake_quant_equals_the_exports_dequantised_weight(preset: str, extra) -> None:
    cfg, model = _model(preset, "always", extra)
    ctl = attach_qat(model, cfg.quant)
    assert ctl is not None and ctl.active
    linears = {n for n, m in model.named_modules() if isinstance(m, CastedLinear)}
    int_linears = {n for n in linears if choose_format(f"{n}.weight", model.get_submodule(n).weight, cfg.quant).startswith("int")}
    assert set(ctl.quantizers) == int_linears and len(int_linears) >= 10  # every quantised linear
    for name, fq in ctl.quantizers.items():
        w = model.get_submodule(name).weight
        wname = f"{name}.weight"
        exported = dequantize_tensor(quantize_tensor(wname, w, choose_format(wname, w, cfg.quant), cfg.quant))
        assert torch.equal(fq(w.float()), exported), name
        assert torch.equal(fq(w.bfloat16()), exported.bfloat16()), name  # the bf16 copy CastedLinear passes in


def test_straight_through_gradient_and_no_extra_state() -> None:
    cfg, model = _model("pr401", "always")
    keys = set(model.state_dict())
    attach_qat(model, cfg.quant)
    assert set(model.state_dict()) == keys  # no fake-quantiser state is saved or exported
    lin = model.blocks[0].mlp.fc
    x = torch.randn(3, lin.in_features, requires_grad=True)
    lin(x).sum().backward()
    # y = x Wq^T with Wq = q(W) in the forward; straight-through: dL/dW = dL/dWq = 1^T x for every row
    assert torch.allclose(lin.weight.grad, x.detach().sum(0).expand(lin.out_features, -1))


@pytest.mark.slow  # inductor compile: ~7 s on an idle 2-core machine, 35-50 s when it is shared
def test_late_qat_switches_the_forward_under_torch_compile() -> None:
    cfg, model = _model("pr401", "late")
    ctl = attach_qat(model, cfg.quant)
    assert not ctl.active
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        before = compiled(ids, ids)
        eager_off = model(ids, ids)
        assert ctl.update(0.5, step=10) is None  # above the threshold: still off
        msg = ctl.update(0.1, step=11)
        assert msg and msg.startswith("late_qat:enabled step:11")
        after = compiled(ids, ids)
        eager_on = model(ids, ids)
    assert torch.allclose(before, eager_off, atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-4)  # the compiled graph saw the switch
    assert torch.allclose(after, eager_on, atol=1e-5)  # and the same grid as eager (fp16 scale rounding kept)
    fq = ctl.quantizers["blocks.0.mlp.fc"]
    w = model.blocks[0].mlp.fc.weight
    assert torch.equal(torch.compile(fq, fullgraph=True)(w.float()), fq(w.float()))
    assert time.perf_counter() - t0 < 300
