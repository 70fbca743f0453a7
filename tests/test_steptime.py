"""The 8xH100 step-time model (pgolf.train.steptime): its error on every record, the frozen
constants equal to the fit, and the properties a planning tool must have."""

from __future__ import annotations

import json
import math

import pytest

from pgolf.cli import main
from pgolf.config import load_config
from pgolf.train import steptime as st

# Bounds the model meets on every record (it achieves <= 3.7% on ms/step and steps).
MS_BOUND, STEPS_BOUND, LOOP_STEP_BOUND, PHASE_BOUND = 0.06, 0.06, 0.08, 0.10


def test_record_errors():
    rows = st.record_table()
    print("\n" + st.FITTED.describe() + "\n" + st.format_record_table(rows))
    assert {r["preset"] for r in rows} == {"baseline", "pr89", "pr201", "pr401", "pr549", "pr1218", "pr1394", "pr1493", "pr1787", "pr1855"}
    for r in rows:
        assert abs(r["ms_error"]) <= MS_BOUND, r
        assert abs(r["steps_error"]) <= STEPS_BOUND, r
        if r["logged_loop_on_step"] is not None:
            assert abs(r["predicted_loop_on_step"] / r["logged_loop_on_step"] - 1) <= LOOP_STEP_BOUND, r
        else:
            assert r["predicted_loop_on_step"] is None


def test_phase_step_times():
    """Before and after the loops switch on, each record's observed step time is met."""
    for rec in st.RECORDS:
        cfg = load_config(rec.preset, "8xh100", [])
        for looping, seconds in st.record_step_times(rec, cfg.model.loop_enable_at):
            pred = st.step_seconds(st.step_features(cfg, looping), st.FITTED)
            assert abs(pred / seconds - 1) <= PHASE_BOUND, (rec.name, looping, pred, seconds)


def test_frozen_constants_are_the_fit():
    fit = st.fit_constants()
    for key in ("overhead_s", "matmul_flops_per_s", "attention_flops_per_s"):
        assert getattr(fit, key) == pytest.approx(getattr(st.FITTED, key), rel=1e-6), key
    fixed, rate = st.fit_hessian_constants()
    assert fixed == pytest.approx(st.HESSIAN_FIXED_SECONDS, rel=1e-6, abs=1e-9)
    assert rate == pytest.approx(st.HESSIAN_FLOPS_PER_SECOND, rel=1e-6)
    # the fitted rates are physical: below the bf16 peak, overhead a few ms to tens of ms
    assert 0.1 < st.FITTED.matmul_flops_per_s / st.H100_BF16_DENSE_PEAK < 1.0
    assert 0.001 < st.FITTED.overhead_s < 0.05


def test_fit_reacts_to_the_data():
    """Refitting on records whose logged times are halved changes the constants (the fit is real)."""
    from dataclasses import replace

    halved = tuple(replace(r, ms_per_step=r.ms_per_step / 2, steps=r.steps * 2,
                           loop_on_step=None if r.loop_on_step is None else r.loop_on_step * 2) for r in st.RECORDS)
    fit = st.fit_constants(halved)
    assert fit.matmul_flops_per_s > 1.5 * st.FITTED.matmul_flops_per_s


def test_hessian_times():
    for rec in st.HESSIAN_RECORDS:
        ser = st.serialisation_seconds(load_config(rec.preset, "8xh100", []))
        assert abs(ser["gptq_hessian_seconds"] / rec.seconds - 1) <= 0.25, (rec, ser)


def _ms(preset, overrides=(), looping=False):
    cfg = load_config(preset, "8xh100", list(overrides))
    return 1e3 * st.step_seconds(st.step_features(cfg, looping), st.FITTED)


def test_more_layers_more_time_loops_more_time():
    assert _ms("pr1218", [("model.num_layers", 13)]) > _ms("pr1218") > _ms("pr1218", [("model.num_layers", 9), ("model.xsa_last_n", 9)])
    assert _ms("pr1855", looping=True) > _ms("pr1855", looping=False)
    assert _ms("pr401", [("train.train_batch_tokens", 2 * 786432)]) > 1.5 * _ms("pr401") - 20


def test_more_newton_schulz_steps_more_time():
    f5 = st.step_features(load_config("pr401", "8xh100", []), False)
    f10 = st.step_features(load_config("pr401", "8xh100", [("optim.muon_backend_steps", 10)]), False)
    assert f10.ns_flops == pytest.approx(2 * f5.ns_flops)
    pe = st.step_features(load_config("pr1855", "8xh100", [("optim.muon_backend_steps", 10)]), False)
    pe5 = st.step_features(load_config("pr1855", "8xh100", []), False)
    assert pe.ns_flops == pe5.ns_flops  # Polar-Express runs at most its five tuples
    # sharded banks: ceil(11 / 8) = 2 matrices of each MLP bank per rank, round robin balances
    rr = st.step_features(load_config("pr1855", "8xh100", [("optim.muon_layout", "round_robin")]), False)
    assert rr.ns_flops != pe5.ns_flops and rr.comm_bytes != pe5.comm_bytes


def test_schedule():
    # no loops: steps = ceil(train ms / ms per step), capped by iterations
    assert st.schedule(100.0, 100.0, 590.0, loop_enable_at=0.0, has_loops=False, iterations=20000) == (5900, None)
    assert st.schedule(100.0, 100.0, 590.05, loop_enable_at=0.0, has_loops=False, iterations=20000) == (5901, None)
    assert st.schedule(100.0, 100.0, 590.0, loop_enable_at=0.0, has_loops=False, iterations=1000) == (1000, None)
    # loops from 35%: 206.5 s at 100 ms -> switch at step 2065, then 383.5 s at 150 ms
    steps, on = st.schedule(100.0, 150.0, 590.0, loop_enable_at=0.35, has_loops=True, iterations=20000)
    assert on == math.ceil(0.35 * 590.0 * 1e3 / 100.0) == 2065
    assert steps == on + math.ceil((590e3 - on * 100.0) / 150.0)
    # loops on from the start, and a run too short to reach the switch
    assert st.schedule(100.0, 150.0, 600.0, loop_enable_at=0.0, has_loops=True, iterations=20000) == (4000, 0)
    assert st.schedule(100.0, 150.0, 600.0, loop_enable_at=0.5, has_loops=True, iterations=100) == (100, None)
    # no cap: the iteration count, the switch at the fraction of it
    assert st.schedule(100.0, 150.0, 0.0, loop_enable_at=0.5, has_loops=True, iterations=1000, capped=False) == (1000, 500)


def test_predict_run_reserve_and_loop_switch():
    cfg = load_config("pr1394", "8xh100", [])
    plan = st.predict_run(cfg, with_eval=False)
    assert plan["reserve_seconds"] == cfg.quant.gptq_reserve_seconds == 12.0
    assert plan["train_seconds"] == pytest.approx(600.0 - 12.0)
    off, on = plan["ms_per_step_loops_off"], plan["ms_per_step_loops_on"]
    assert on > off
    assert plan["loop_on_step"] == math.ceil(0.5 * 588e3 / off)
    assert plan["steps"] == plan["loop_on_step"] + math.ceil((588e3 - plan["loop_on_step"] * off) / on)
    # a later switch means more steps; a longer reserve fewer
    later = st.predict_run(load_config("pr1394", "8xh100", [("model.loop_enable_at", 0.8)]), with_eval=False)
    assert later["steps"] > plan["steps"]
    more = st.predict_run(load_config("pr1394", "8xh100", [("quant.gptq_reserve_seconds", 60.0)]), with_eval=False)
    assert more["steps"] < plan["steps"] and more["train_seconds"] == pytest.approx(540.0)
    auto = st.predict_run(load_config("pr1394", "8xh100", [("quant.gptq_reserve_seconds", -1.0)]), with_eval=False)
    from pgolf.quant.reserve import suggested_reserve

    hess = auto["serialisation"]["gptq_hessian_seconds"]
    assert auto["reserve_seconds"] == suggested_reserve(hess) >= 1.2 * hess


def test_inspect_8xh100_plan(capsys):
    assert main(["inspect", "--preset", "pr401", "--profile", "8xh100", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    plan = rep["plan_8xh100"]
    assert plan["steps"] > 6000 and 70 < plan["ms_per_step_loops_off"] < 100 and plan["ms_per_step_loops_on"] is None
    assert plan["eval"]["sliding_seconds"] > 0 and plan["serialisation"]["total_seconds"] > 0
    assert main(["inspect", "--preset", "pr401", "--profile", "8xh100"]) == 0
    text = capsys.readouterr().out
    assert "8xH100 plan" in text and "steps in" in text and "evaluate" in text
    assert main(["inspect", "--preset", "pr401", "--profile", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan_8xh100"] is None
