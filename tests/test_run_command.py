"""`pgolf run` trains a fixed number of steps and says what its numbers are: a labelled prefix of
the validation split, the diagnostic pass switchable, an estimate before each evaluation, and a
warning when training stopped far below the steps its schedules assume."""

from __future__ import annotations

import json

from pgolf.cli import main
from tests.conftest import tiny_set_args


def test_pgolf_run_trains_the_steps_asked_and_labels_a_prefix(demo_dir, tmp_path, capsys):
    out = tmp_path / "run"
    sets = tiny_set_args([("eval.max_val_tokens", 2048), ("train.schedule_steps", 40), ("eval.diagnostic", False)])
    assert main(["run", "--preset", "baseline", "--steps", "3", "--data", str(demo_dir), "--out", str(out), *sets]) == 0
    table = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["val_bpb_prequant"] is None
    assert summary["val_prefix"]["targets"] == summary["val_targets"] < summary["val_prefix"]["of"]
    assert "not a score" in table and "val_bpb before quantisation" not in table
    log = (out / "log.txt").read_text()
    assert "eval_prefix:targets:" in log and "DIAGNOSTIC post_avg skipped" in log
    assert "eval_estimate pass:roundtrip" in log
    assert "WARNING: training stopped at step 3, far below the 40 steps" in log


def test_a_whole_split_is_not_labelled_and_the_diagnostic_runs_by_default(demo_dir, tmp_path):
    from pgolf.config import load_config
    from pgolf.train.run import run_training
    from tests.conftest import TINY_RUN

    cfg = load_config("baseline", "cpu", TINY_RUN + [("data.path", str(demo_dir)), ("eval.max_val_tokens", 0),
                                                     ("train.iterations", 2), ("train.schedule_steps", 2)])
    s = run_training(cfg, tmp_path / "r")
    assert s["val_prefix"] is None and s["val_bpb_prequant"] is not None
    log = (tmp_path / "r" / "log.txt").read_text()
    assert "eval_prefix" not in log and "WARNING: training stopped" not in log
    assert "eval_estimate pass:diagnostic" in log
