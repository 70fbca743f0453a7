"""Runs that never lie and never lose work: run folders, data identity, checkpoints and resume,
interruptions and faults. Each case failed (silently) before these guards existed."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pgolf.cli import main
from pgolf.config import load_config
from pgolf.errors import DataError
from pgolf.train.checkpoint import COMPLETE, list_checkpoints
from pgolf.train.loop import TrainingDivergedError
from pgolf.train.run import run_training
from pgolf.train.rundir import RunFolderError
from tests.conftest import REPO, TINY_RUN, tiny_set_args

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _cfg(demo_dir: Path, preset: str = "baseline", extra: list | None = None):
    return load_config(preset, "cpu", TINY_RUN + [("data.path", str(demo_dir))] + list(extra or []))


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss; a resumed run's later lines win (the interrupted attempt's come first)."""
    out: dict[int, float] = {}
    for line in (run_dir / "log.txt").read_text().splitlines():
        m = re.match(r"step:(\d+)/\d+ train_loss:([0-9.]+)", line)
        if m:
            out[int(m.group(1))] = float(m.group(2))
    return out


def _status_lines(run_dir: Path) -> list[str]:
    return [line for line in (run_dir / "log.txt").read_text().splitlines() if line.startswith("status:")]


# ------------------------------------------------------------------------------------------------
# run folders


def test_existing_run_folder_is_refused_and_overwrite_replaces_it_whole(demo_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "baseline", "--profile", "cpu", "--data", str(demo_dir), "--out", str(out)] + tiny_set_args()
    assert main(args) == 0
    first_config = (out / "config.json").read_text()
    (out / "stray_from_first_run.txt").write_text("x")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "--overwrite" in err and err.count("\n") == 1
    assert (out / "config.json").read_text() == first_config  # nothing was touched
    assert main(args + ["--overwrite", "--set", "train.seed=7"]) == 0
    assert not (out / "stray_from_first_run.txt").exists()  # the old folder was replaced as a whole
    assert json.loads((out / "config.json").read_text())["train"]["seed"] == 7
    assert (out / "log.txt").read_text().count("status:finished") == 1  # one run's log, not two


@pytest.mark.parametrize("problem", ["data_path", "tokenizer", "vocab"])
def test_failed_preflight_leaves_no_run_folder(demo_dir, tmp_path, problem, capsys):
    out = tmp_path / "never"
    extra = {"data_path": ["--data", str(tmp_path / "nowhere")],
             "tokenizer": ["--data", str(demo_dir), "--tokenizer", str(tmp_path / "missing.model")],
             "vocab": ["--data", str(demo_dir), "--set", "model.vocab_size=2048"]}[problem]
    assert main(["train", "--preset", "baseline", "--profile", "cpu", "--out", str(out)] + tiny_set_args() + extra) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# data identity


def _copy_data(demo_dir: Path, dst: Path) -> Path:
    shutil.copytree(demo_dir, dst)
    return dst


def test_a_tokenizer_that_is_not_the_manifests_is_refused(demo_dir, tmp_path, shared_tokenizer):
    """The official 1024-piece tokenizer has the demo's vocabulary size, so only the identity
    check tells that the demo shards were not made with it."""
    data = _copy_data(demo_dir, tmp_path / "data")
    cfg = _cfg(data, extra=[("data.tokenizer", str(shared_tokenizer))])
    with pytest.raises(DataError, match=r"is not the one the shards in .* were made with"):
        run_training(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_shard_missing_from_the_manifest_is_refused(demo_dir, tmp_path):
    data = _copy_data(demo_dir, tmp_path / "data")
    shard = sorted(data.glob("fineweb_train_*.bin"))[0]
    shutil.copy(shard, data / "fineweb_train_999999.bin")
    with pytest.raises(DataError, match=r"fineweb_train_999999.bin: this shard is not listed in .*manifest.json"):
        run_training(_cfg(data), tmp_path / "run")


def test_without_a_manifest_the_run_says_so(demo_dir, tmp_path):
    data = _copy_data(demo_dir, tmp_path / "data")
    (data / "manifest.json").unlink()
    tok = next(data.glob("*.model"))
    run_training(_cfg(data, extra=[("data.tokenizer", str(tok))]), tmp_path / "run")
    assert "data_identity:no_manifest" in (tmp_path / "run" / "log.txt").read_text()


# ------------------------------------------------------------------------------------------------
# checkpoints, resume, interruptions


def _train_cmd(out: Path, demo_dir: Path, preset: str, extra: list, nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "pgolf"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "pgolf"]
    return launcher + ["train", "--preset", preset, "--profile", "cpu", "--data", str(demo_dir), "--out", str(out)] + \
        tiny_set_args(extra)


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.is_file() and pattern in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {pattern!r} appeared")
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} did not appear within {timeout} s")


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants: torchrun starts its workers in sessions of their
    own, so killing the launcher's process group would leave them running."""
    pids, frontier = [pid], [pid]
    while frontier:
        kids = subprocess.run(["pgrep", "-P", str(frontier.pop())], capture_output=True, text=True).stdout.split()
        pids += [int(k) for k in kids]
        frontier += [int(k) for k in kids]
    for p in reversed(pids):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


FRONTIER_TINY = [("model.vocab_size", 1024), ("model.num_layers", 6), ("model.loop_start", 1), ("model.loop_end", 2),
                 ("model.parallel_start", 4), ("model.xsa_last_n", 6), ("quant.gptq", "off"),
                 ("data.transform", "none")]  # the demo data is plain sp1024, not CaseOps


@pytest.mark.parametrize("preset,extra,nproc", [
    ("baseline", [], 1),
    ("pr401", [("model.bigram_buckets", 64), ("model.num_layers", 4), ("model.xsa_last_n", 2)], 1),
    ("pr1855", FRONTIER_TINY, 1),
    ("baseline", [("train.grad_accum_base", 2)], 2),
])
def test_sigkill_then_resume_gives_the_uninterrupted_losses(demo_dir, tmp_path, preset, extra, nproc):
    """A run killed with SIGKILL at a random step and resumed logs exactly the per-step
    losses of a run that was never interrupted (EMA, SWA, QAT, loops, loader, RNG all restored)."""
    extra = extra + [("train.iterations", 8), ("train.checkpoint_every", 3)]
    if nproc == 1:
        extra.append(("train.grad_accum_base", 1))
    ref = subprocess.run(_train_cmd(tmp_path / "ref", demo_dir, preset, extra, nproc), env=ENV, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(out, demo_dir, preset, extra, nproc), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    kill_after = random.randint(4, 7)  # any step: before, during or after the step-6 checkpoint
    try:
        _wait_for(out / "log.txt", f"step:{kill_after}/8 train_loss", proc)
    finally:
        _kill_tree(proc.pid)  # the launcher and every worker, with no chance to clean up
        proc.wait()
    assert not (out / "summary.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "pgolf", "train", "--resume", str(out)] if nproc == 1 else
                             [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                              "-m", "pgolf", "train", "--resume", str(out)],
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = _losses(tmp_path / "ref"), _losses(out)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    assert got == expected
    log = (out / "log.txt").read_text()
    assert re.search(r"status:resumed step:[36] ", log), (kill_after, log[-2000:])
    assert log.rstrip().endswith("status:finished")
    s_ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    s_res = json.loads((out / "summary.json").read_text())
    assert s_res["val_bpb_roundtrip"] == s_ref["val_bpb_roundtrip"]


def test_sigint_checkpoints_and_marks_the_log_then_resume_finishes(demo_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(out, demo_dir, "baseline", [("train.iterations", 60), ("train.grad_accum_base", 1)]),
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "log.txt", "step:3/60 train_loss", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with: pgolf train --resume" in err and "Traceback" not in err
    status = _status_lines(out)
    assert status and status[-1].startswith("status:interrupted") and "resumable:true" in status[-1]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "status" and events[-1]["status"] == "interrupted"
    assert [c for c in list_checkpoints(out) if c.complete]
    assert main(["train", "--resume", str(out), "--set", "train.iterations=30"]) == 2  # shortening the run changes it: refused
    assert main(["train", "--resume", str(out), "--set", "train.progress=false"]) == 0  # cosmetic settings may change
    assert (out / "summary.json").is_file()


def test_resume_ignores_an_incomplete_newer_checkpoint(demo_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(demo_dir, extra=[("train.iterations", 6), ("train.checkpoint_every", 2)])
    run_training(cfg, out)
    (out / "summary.json").unlink()  # pretend the run died after its last checkpoint
    complete = [c for c in list_checkpoints(out) if c.complete]
    newest = complete[-1]
    fake = newest.path.with_name("step_000999")
    shutil.copytree(newest.path, fake)
    (fake / COMPLETE).unlink()  # no completion marker: a checkpoint cut short
    broken = newest.path.with_name("step_000998")
    shutil.copytree(newest.path, broken)
    (broken / "rank0.pgolf").write_bytes(b"truncated")  # marker present, file does not match it
    infos = {c.step: c.complete for c in list_checkpoints(out)}
    assert infos[999] is False and infos[998] is False and infos[newest.step] is True
    run_training(cfg, out, mode="resume")
    assert f"status:resumed step:{newest.step}" in (out / "log.txt").read_text()


def test_a_non_finite_loss_stops_with_the_step_after_checkpointing_the_last_good_state(demo_dir, tmp_path, monkeypatch):
    from pgolf.train import loop

    real = loop.Trainer.train_step
    calls = {"n": 0}

    def planted(self, *args, **kwargs):
        loss = real(self, *args, **kwargs)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(loop.Trainer, "train_step", planted)
    out = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"training diverged at step 4: .* checkpointed at step 3"):
        run_training(_cfg(demo_dir, extra=[("train.iterations", 8)]), out)
    assert [c.step for c in list_checkpoints(out) if c.complete] == [3]
    assert _status_lines(out)[-1].startswith("status:diverged")
    assert not (out / "final_model.pgolf").exists() and not (out / "summary.json").exists()


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(demo_dir, tmp_path, monkeypatch):
    import errno

    from pgolf.quant import container
    from pgolf.train.checkpoint import CheckpointError

    real = container.write_bytes_atomic
    calls = {"n": 0}

    def disk_full(path, data):
        calls["n"] += 1
        if calls["n"] == 3:  # the second checkpoint's rank file (the first wrote rank file + marker)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(container, "write_bytes_atomic", disk_full)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint \(No space left on device\).*previous complete checkpoint is intact"):
        run_training(_cfg(demo_dir, extra=[("train.iterations", 8), ("train.checkpoint_every", 2)]), out)
    complete = [c for c in list_checkpoints(out) if c.complete]
    assert [c.step for c in complete] == [2]
    assert not list((out / "checkpoints").rglob(".*.tmp"))  # no half-written temp file left behind


def test_a_killed_rank_ends_the_other_with_an_error_and_no_artifact(demo_dir, tmp_path):
    out = tmp_path / "run"
    cmd = _train_cmd(out, demo_dir, "baseline", [("train.iterations", 400), ("train.grad_accum_base", 2),
                                                ("train.collective_timeout_seconds", 60)], nproc=2)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "log.txt", "step:3/400 train_loss", proc)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    workers = [int(c) for c in children]
    assert len(workers) == 2
    t0 = time.time()
    os.kill(max(workers), signal.SIGKILL)  # one worker dies without a word
    proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert time.time() - t0 < 120
    assert not (out / "final_model.pgolf").exists() and not (out / "summary.json").exists()


def test_eval_refuses_training_shards_and_a_tokenizer_the_artifact_was_not_trained_with(demo_dir, tmp_path, shared_tokenizer, capsys):
    out = tmp_path / "run"
    run_training(_cfg(demo_dir, extra=[("train.iterations", 2)]), out)
    meta_tok = next(demo_dir.glob("*.model"))
    base = ["eval", "--artifact", str(out / "final_model.pgolf"), "--stride", "0", "--json", "--max-tokens", "4096"]
    assert main(base + ["--val", str(demo_dir / "fineweb_train_*.bin"), "--tokenizer", str(meta_tok)]) == 2
    assert "matches training shards" in capsys.readouterr().err
    assert main(base + ["--val", str(demo_dir / "fineweb_train_*.bin"), "--tokenizer", str(meta_tok), "--allow-train-shards"]) == 0
    capsys.readouterr()
    assert main(base + ["--val", str(demo_dir / "fineweb_val_*.bin"), "--tokenizer", str(shared_tokenizer)]) == 2
    assert "not the tokenizer this artifact was trained with" in capsys.readouterr().err
    assert main(base + ["--val", str(demo_dir / "fineweb_val_*.bin"), "--tokenizer", str(meta_tok)]) == 0
    scored = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert scored["val_bpb"] == pytest.approx(summary["val_bpb_roundtrip"], abs=1e-9)


def test_messages_name_what_the_user_typed(demo_dir, tmp_path, monkeypatch, capsys):
    """The bundled script's user sets DATA_PATH, not data.path; prepare's user typed --tokenizer."""
    from pgolf.config import to_dict
    from pgolf.submit.entry import main as script_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATA_PATH", str(tmp_path / "no-such-data"))
    monkeypatch.setenv("TOKENIZER_PATH", str(next(demo_dir.glob("*.model"))))
    with pytest.raises(SystemExit) as exc:
        script_main(to_dict(_cfg(demo_dir)), __file__)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no training shards match") and "point DATA_PATH at" in err and "data.path" not in err
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("*.txt"))

    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "a"}\n')
    assert main(["data", "prepare", "--docs", str(docs), "--out", str(tmp_path / "d"), "--val-docs", "1",
                 "--tokenizer", str(tmp_path / "missing.model")]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer" in err and "missing.model" in err and not (tmp_path / "d").exists()


def test_progress_bars_stay_out_of_captured_output(demo_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pgolf", "train", "--preset", "baseline", "--profile", "cpu", "--data", str(demo_dir),
                           "--out", str(out)] + tiny_set_args([("train.iterations", 3), ("train.progress", True)]),
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr and "\r" not in proc.stdout  # tqdm draws with carriage returns on a terminal only


def test_configs_that_name_the_same_data_compare_equal(demo_dir, tmp_path, monkeypatch):
    from pgolf.config import to_dict
    from pgolf.submit.record import config_differences

    implicit = to_dict(_cfg(demo_dir))  # data.tokenizer "": the manifest's tokenizer
    explicit = to_dict(_cfg(demo_dir, extra=[("data.tokenizer", str(next(demo_dir.glob("*.model"))))]))
    assert implicit["data"]["tokenizer"] != explicit["data"]["tokenizer"]
    assert config_differences(implicit, explicit) == []
    monkeypatch.chdir(demo_dir.parent)
    relative = to_dict(_cfg(demo_dir, extra=[("data.path", demo_dir.name)]))
    assert config_differences(implicit, relative) == []
    other_tok = tmp_path / "other.model"
    other_tok.write_bytes(b"not the same tokenizer")
    assert config_differences(implicit, to_dict(_cfg(demo_dir, extra=[("data.tokenizer", str(other_tok))]))) == ["data.tokenizer"]
