"""`pgolf compare` and `pgolf runs` on real tiny runs: two finished runs that differ in one
setting, one interrupted with a checkpoint, and copies edited to end diverged, failed, killed
(no status line) and still running."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest

from pgolf.submit.compare import last_status, run_status
from tests.conftest import tiny_set_args
from tests.test_ablate import _cli, interrupt_run

TINY = tiny_set_args([("train.iterations", 3), ("eval.max_val_tokens", 2048)])


def _strip_status(run_dir) -> None:
    """A run killed with SIGKILL: no summary, no ending status line."""
    (run_dir / "summary.json").unlink()
    log = run_dir / "log.txt"
    log.write_text("".join(line for line in log.read_text().splitlines(keepends=True) if not line.startswith("status:")))


@pytest.fixture(scope="module")
def runs(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    train = ["train", "--preset", "baseline", "--profile", "cpu", *TINY, "--data", str(demo_dir)]
    assert _cli(train + ["--out", str(root / "a")])[0] == 0
    assert _cli(train + ["--set", "optim.matrix_lr=0.08", "--seed", "7", "--out", str(root / "b")])[0] == 0
    with pytest.MonkeyPatch.context() as mp:
        interrupt_run(mp, 0)
        assert _cli(train + ["--out", str(root / "nested" / "c")])[0] == 143
    for name, ending in (("diverged", "status:diverged training diverged at step 2\n"),
                         ("failed", "status:failed step:2 error:RuntimeError: boom resumable:false\n")):
        shutil.copytree(root / "a", root / name)
        _strip_status(root / name)
        with open(root / name / "log.txt", "a") as f:
            f.write(ending)
    for name in ("killed", "running"):
        shutil.copytree(root / "a", root / name)
        _strip_status(root / name)
    hour_ago = time.time() - 3600
    for f in (root / "killed").iterdir():
        os.utime(f, (hour_ago, hour_ago))
    return root


@pytest.mark.slow
def test_runs_lists_every_run_with_its_status(runs):
    rc, printed, _ = _cli(["runs", str(runs), "--json"])
    assert rc == 0
    by_name = {os.path.relpath(r["path"], runs): r for r in json.loads(printed)}
    assert set(by_name) == {"a", "b", os.path.join("nested", "c"), "diverged", "failed", "killed", "running"}
    status = {k: v["status"] for k, v in by_name.items()}
    assert status == {"a": "finished", "b": "finished", os.path.join("nested", "c"): "interrupted", "diverged": "diverged",
                      "failed": "failed", "killed": "unknown", "running": "running"}
    interrupted = by_name[os.path.join("nested", "c")]
    assert interrupted["resumable"] and interrupted["resume_step"] == 1 and interrupted["steps"] == 1
    assert by_name["a"]["resume_step"] is None and not by_name["a"]["resumable"]
    summary = json.loads((runs / "a" / "summary.json").read_text())
    assert by_name["a"]["val_bpb_roundtrip"] == summary["val_bpb_roundtrip"] and by_name["a"]["steps"] == 3
    # a killed copy still has its round-trip line in the log: read from there when no summary
    assert by_name["killed"]["val_bpb_roundtrip"] == pytest.approx(summary["val_bpb_roundtrip"], abs=1e-8)

    rc, table, _ = _cli(["runs", str(runs)])
    line = next(x for x in table.splitlines() if x.startswith(os.path.join("nested", "c")))
    assert re.search(r"interrupted\s+1\s+baseline/cpu\s+1/3", line), line


def test_status_reading_rules(tmp_path):
    assert last_status("status:interrupted step:4\nstatus:resumed step:4\n") is None  # resumed and going on
    assert last_status("status:resumed step:4\nstatus:finished\n") == "finished"
    (tmp_path / "log.txt").write_text("step:1/5 train_loss:3.0 train_time:5ms step_avg:5.00ms\n")
    assert run_status(tmp_path) == ("running", None)
    assert run_status(tmp_path, now=time.time() + 3600) == ("unknown", None)


@pytest.mark.slow
def test_compare_prints_the_differing_settings_and_plots(runs, tmp_path):
    png = tmp_path / "curves.png"
    rc, printed, _ = _cli(["compare", str(runs / "a"), str(runs / "b"), "--plot", str(png)])
    assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "settings that differ between the runs: optim.matrix_lr" in printed
    sa, sb = (json.loads((runs / n / "summary.json").read_text()) for n in ("a", "b"))
    row_b = next(x for x in printed.splitlines() if x.startswith(str(runs / "b")))
    assert re.search(r"baseline/cpu\s+0\.08\s+7\s+3\s", row_b), row_b
    assert f"{sb['val_bpb_roundtrip']:.5f}" in row_b and f"{sb['val_bpb_prequant']:.5f}" in row_b
    assert f"{sb['artifact_bytes']:,}" in row_b

    rc, printed, _ = _cli(["compare", str(runs / "[ab]"), "--json"])  # a glob
    data = json.loads(printed)
    assert data["differing_settings"] == ["optim.matrix_lr"]
    assert [r["settings"] for r in data["runs"]] == [{"optim.matrix_lr": 0.04}, {"optim.matrix_lr": 0.08}]
    assert [r["val_bpb_roundtrip"] for r in data["runs"]] == [sa["val_bpb_roundtrip"], sb["val_bpb_roundtrip"]]
    assert [r["tokens_per_second"] for r in data["runs"]] == [sa["tokens_per_second"], sb["tokens_per_second"]]


def test_compare_errors_are_one_line(tmp_path):
    for args, message in ((["compare", str(tmp_path / "nope")], "no such folder"),
                          (["compare", str(tmp_path / "x*")], "matches nothing"),
                          (["compare", str(tmp_path)], "neither a run folder"),
                          (["runs", str(tmp_path / "nope")], "not a folder")):
        rc, _, err = _cli(args)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
