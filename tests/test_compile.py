"""The GPU path compiles: every preset's model under ``torch.compile(fullgraph=True, dynamic=False)``
(inductor on CPU) with no graph break, equal to eager; and a compiled training run goes through
the switches that change the graph (loops switching on, late QAT, EMA/SWA, the compile warm-up
and its roll-back) with the eager run's losses.

``fullgraph=True`` turns any graph break into an error, so these tests fail on one. Inductor
compiles take 10-60 s each on a shared 2-core machine: the models are tiny."""

from __future__ import annotations

import re

import pytest
import torch

from pgolf.config import list_presets, load_config
from pgolf.model.gpt import build_model
from pgolf.train.run import run_training
from tests.conftest import TINY_RUN
from tests.test_frontier_model import tiny


@pytest.fixture(autouse=True)
def _restore_newton_schulz():
    """A compiled run installs compiled Newton-Schulz functions process-wide (pgolf.train.setup.
    maybe_compile); later tests compare eager Muon bit for bit, so put the eager ones back."""
    from pgolf.optim import newton_schulz

    saved = {kind: newton_schulz.newton_schulz_impl(kind) for kind in ("standard", "polar_express")}
    yield
    for kind, fn in saved.items():
        newton_schulz.set_newton_schulz_impl(fn, kind)


def _loss_and_grads(fn, model, ids, targets):
    """Loss of ``fn`` (the model or its compiled wrapper) and the gradients it leaves on ``model``."""
    model.zero_grad(set_to_none=True)
    loss = fn(ids, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", list_presets())
def test_every_presets_model_compiles_without_a_graph_break_and_equals_eager(preset):
    torch.manual_seed(0)
    cfg = tiny(preset)
    model = build_model(cfg)
    with torch.no_grad():  # away from the zero-initialised projections, so every path carries signal
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    ids[:, 0] = cfg.bos_id
    ids[1, 17] = cfg.bos_id  # a document boundary inside a row (document masking, SmearGate v2's BOS fix)
    targets = torch.roll(ids, -1, dims=1)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    states = [False, True] if cfg.num_loops else [False]
    for looping in states:  # both graphs of a looped model: before and after the switch
        model.set_looping(looping)
        eager_loss, eager_grads = _loss_and_grads(model, model, ids, targets)
        comp_loss, comp_grads = _loss_and_grads(compiled, model, ids, targets)
        assert torch.isfinite(comp_loss)
        assert comp_loss.item() == pytest.approx(eager_loss.item(), rel=1e-5, abs=1e-6), (preset, looping)
        assert eager_grads.keys() == comp_grads.keys()
        for name, g in eager_grads.items():
            torch.testing.assert_close(comp_grads[name], g, rtol=1e-3, atol=1e-5, msg=lambda m: f"{preset} {name}: {m}")


def _losses(run_dir) -> list[float]:
    return [float(m.group(1)) for m in re.finditer(r"step:\d+/\d+ train_loss:([0-9.]+)", (run_dir / "log.txt").read_text())]


def test_a_compiled_run_goes_through_every_graph_switch_with_the_eager_losses(demo_dir, tmp_path):
    """pr1855's stack, 6 layers: loops switch on at half the run, late QAT fires in the warmdown,
    EMA from the start and SWA late; compile warm-up steps run and are rolled back."""
    extra = [("data.path", str(demo_dir)), ("data.transform", "none"), ("model.vocab_size", 1024),
             ("model.num_layers", 6), ("model.loop_start", 1), ("model.loop_end", 2), ("model.parallel_start", 4),
             ("model.xsa_last_n", 6), ("train.iterations", 8), ("train.warmdown_iters", 6),
             ("train.warmup_steps", 2), ("quant.qat", "late"), ("quant.qat_threshold", 0.5),
             ("avg.ema_decay", 0.9), ("avg.swa_every", 2), ("avg.swa_start_scale", 0.5), ("quant.gptq", "off"),
             ("train.grad_accum_base", 1)]
    runs = {}
    for mode in ("off", "on"):
        cfg = load_config("pr1855", "cpu", TINY_RUN + extra + [("train.compile", mode)])
        torch._dynamo.reset()
        run_training(cfg, tmp_path / mode)
        runs[mode] = _losses(tmp_path / mode)
    log = (tmp_path / "on" / "log.txt").read_text()
    assert "layer_loop:enabled" in log and "late_qat:enabled" in log, log[-3000:]
    assert len(runs["on"]) == len(runs["off"]) == 8
    assert runs["on"] == pytest.approx(runs["off"], rel=2e-3)
