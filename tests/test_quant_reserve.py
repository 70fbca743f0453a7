"""The GPTQ reserve is checked against the measured Hessian collection, never trusted."""

from __future__ import annotations

import pytest
import torch

from pgolf.config import load_config
from pgolf.errors import ConfigError
from pgolf.model.gpt import build_model
from pgolf.quant.reserve import GPTQReserveError, check_gptq_reserve, gptq_preflight, gptq_reserve_report, suggested_reserve


def _cfg(reserve: float):
    return load_config("pr1855", "cpu", [("model.num_layers", 3), ("model.xsa_last_n", 3), ("model.loop_start", 1), ("model.loop_end", 1),
                                         ("model.parallel_start", 2), ("model.vocab_size", 64), ("quant.gptq_calib_source", "self"),
                                         ("quant.gptq_calib_batches", 0), ("quant.gptq_calib_seqs", 2), ("quant.gptq_calib_seq_len", 8),
                                         ("quant.gptq_reserve_seconds", reserve)])


def test_a_reserve_shorter_than_the_measured_collection_is_refused() -> None:
    cfg = _cfg(1e-6)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with pytest.raises(GPTQReserveError, match=r"quant.gptq_reserve_seconds=1e-06 is shorter than the GPTQ Hessian collection \(\d") as info:
        gptq_preflight(model, cfg)
    assert isinstance(info.value, ConfigError)  # a user error: one line, exit code 2 in the CLI
    assert "set --set quant.gptq_reserve_seconds=" in str(info.value) and "\n" not in str(info.value)
    reserve, seconds = gptq_preflight(model, _cfg(600.0))
    assert reserve == 600.0 and 0 < seconds < 600
    auto, measured = gptq_preflight(model, _cfg(-1))  # auto: the measurement + 20%, rounded up to 0.5 s
    assert auto == suggested_reserve(measured) >= 1.2 * measured
    with pytest.raises(ConfigError, match="gptq_reserve_seconds"):
        _cfg(-2)
    assert gptq_preflight(model, load_config("pr401", "cpu")) is None  # gptq off: nothing to measure


def test_check_and_report() -> None:
    check_gptq_reserve(5.5, 4.9)
    with pytest.raises(GPTQReserveError, match=r"=0.5 is shorter .*4.70 s, after training.*gptq_reserve_seconds=6 or more"):
        check_gptq_reserve(0.5, 4.7, when="after training")  # R7 seed 42: 0.5 s reserved, 4.7 s collected
    assert suggested_reserve(4.7) == 6.0 and suggested_reserve(0.1) == 0.5
    rep = gptq_reserve_report(5.5, 4.9)
    assert rep == {"gptq_reserve_seconds": 5.5, "gptq_seconds": 4.9, "gptq_within_reserve": True}


def _run_cfg(demo_dir, reserve: float):
    from tests.conftest import TINY_RUN

    return load_config("baseline", "cpu", TINY_RUN + [
        ("data.path", str(demo_dir)), ("quant.gptq", "full"), ("quant.small_numel", 1024), ("quant.gptq_calib_seqs", 2),
        ("train.max_wallclock_seconds", 600.0), ("quant.gptq_reserve_seconds", reserve)])


def test_the_training_path_refuses_a_short_reserve_before_writing_anything(demo_dir, tmp_path) -> None:
    from pgolf.train.run import run_training

    run_dir = tmp_path / "run"
    with pytest.raises(GPTQReserveError, match=r"quant.gptq_reserve_seconds=1e-06 is shorter than the GPTQ Hessian collection"):
        run_training(_run_cfg(demo_dir, 1e-6), run_dir)
    assert not run_dir.exists()  # refused among the pre-flight checks: no folder, log, checkpoint or artifact


def test_the_training_path_logs_the_reserve_against_the_collection(demo_dir, tmp_path) -> None:
    import json

    from pgolf.train.run import run_training

    s = run_training(_run_cfg(demo_dir, -1), tmp_path / "auto")  # auto: measured + 20%
    log = (tmp_path / "auto" / "log.txt").read_text()
    start = [ln for ln in log.splitlines() if ln.startswith("gptq_reserve_seconds:")]
    end = [ln for ln in log.splitlines() if ln.startswith("gptq_reserve:")]
    assert len(start) == 1 and "measured_collection:" in start[0] and "auto" in start[0], log[-2000:]
    assert len(end) == 1 and "collection:" in end[0] and "within_reserve:" in end[0], log[-2000:]
    reserve = float(start[0].split()[0].split(":")[1])
    measured = float(start[0].split("measured_collection:")[1].split("s")[0])
    assert reserve == suggested_reserve(measured) > 0
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert summary["gptq_reserve_seconds"] == reserve == s["gptq_reserve_seconds"]
    assert isinstance(summary["gptq_within_reserve"], bool) and summary["gptq_seconds"] > 0
