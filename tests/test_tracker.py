"""`--tracker tensorboard|wandb`: the metrics.jsonl events of a real tiny run read back from
TensorBoard's event files and from W&B's offline run file, `pgolf track` (replay), the one-line
error when a tracker's package is missing (before anything is written), and a tracker that fails
mid-run without stopping it."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import sys
import time
from pathlib import Path

import pytest

from pgolf.cli import main as cli
from pgolf.train import tracker as tracker_mod
from tests.conftest import tiny_set_args

TINY = tiny_set_args([("train.iterations", 3), ("eval.max_val_tokens", 2048)])


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli(args)
    return rc, out.getvalue(), err.getvalue()


def _train(demo_dir: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return _cli(["train", "--preset", "baseline", "--profile", "cpu", *TINY, "--data", str(demo_dir), "--out", str(out), *extra])


def _events(run_dir: Path, event: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline ``run-*.wandb`` file: a 7-byte W&B header, then LevelDB log
    records (32 KiB blocks; 7-byte record headers: crc, length, type) holding protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if (length == 0 and kind == 0) or pos + 7 + length > len(data):  # zero padding, or a record still being written
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item})
    return rows


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    """W&B's own cache and config (core debug logs) under a temporary folder, not $HOME."""
    root = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(root / var.lower()))
        mp.delenv("WANDB_MODE", raising=False)
        yield


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_metrics_events(demo_dir, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "tb"
    rc, _, err = _train(demo_dir, run, "--tracker", "tensorboard")
    assert rc == 0, err
    scalars = _tensorboard_scalars(run / "tensorboard")
    train = _events(run, "train")
    assert [s for s, _ in scalars["train/train_loss"]] == [r["step"] for r in train] == [1, 2, 3]
    assert [v for _, v in scalars["train/train_loss"]] == pytest.approx([r["train_loss"] for r in train], rel=1e-6)
    assert [v for _, v in scalars["train/lr_scale"]] == pytest.approx([r["lr_scale"] for r in train], rel=1e-6)
    (val,) = _events(run, "val")
    assert scalars["val/val_bpb"] == [(3, pytest.approx(val["val_bpb"], rel=1e-6))]
    summary = json.loads((run / "summary.json").read_text())
    assert scalars["summary/val_bpb_roundtrip"] == [(3, pytest.approx(summary["val_bpb_roundtrip"], rel=1e-6))]
    assert scalars["summary/artifact_bytes"][0][1] == summary["artifact_bytes"]

    # pgolf track: the same events replayed after the fact give the same scalars
    rc, _, err = _cli(["track", str(run), "--tracker", "tensorboard"])
    assert rc == 2 and "exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    rc, printed, err = _cli(["track", str(tmp_path), "--tracker", "tensorboard", "--overwrite"])  # a folder of runs
    assert rc == 0, err
    assert f"{run}: {len((run / 'metrics.jsonl').read_text().splitlines())} events" in printed
    assert _tensorboard_scalars(run / "tensorboard") == scalars


@pytest.mark.slow
def test_wandb_offline_run_holds_the_history(demo_dir, tmp_path, wandb_env):
    pytest.importorskip("wandb")
    run = tmp_path / "wb"
    rc, printed, err = _train(demo_dir, run, "--tracker", "wandb")
    assert rc == 0, err
    assert "wandb:" not in printed + err  # silent: the console belongs to the run's log lines
    (offline,) = (run / "wandb").glob("offline-run-*")
    (run_file,) = offline.glob("run-*.wandb")
    # run.finish() returns once W&B's service has the run; its writer may still be flushing the file
    deadline = time.monotonic() + 60
    rows = _wandb_history(run_file)
    while not any("summary/val_bpb_roundtrip" in row for row in rows) and time.monotonic() < deadline:
        time.sleep(0.5)
        rows = _wandb_history(run_file)
    train = _events(run, "train")
    losses = [(row["_step"], row["train/train_loss"]) for row in rows if "train/train_loss" in row]
    assert losses == [(r["step"], pytest.approx(r["train_loss"], rel=1e-6)) for r in train]
    (val,) = _events(run, "val")
    assert [row["val/val_bpb"] for row in rows if "val/val_bpb" in row] == [pytest.approx(val["val_bpb"], rel=1e-6)]
    summary = json.loads((run / "summary.json").read_text())
    assert [row["summary/val_bpb_roundtrip"] for row in rows if "summary/val_bpb_roundtrip" in row] == [
        pytest.approx(summary["val_bpb_roundtrip"], rel=1e-6)]
    assert "status:finished" in (run / "log.txt").read_text() and "tracker:" not in (run / "log.txt").read_text()


@pytest.mark.parametrize("name, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
@pytest.mark.parametrize("command", ["train", "run", "ablate", "seeds"])
def test_a_missing_tracker_package_is_one_line_before_anything_runs(tmp_path, monkeypatch, name, module, command):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    out = tmp_path / "out"
    args = {"train": ["train", "--preset", "baseline", "--profile", "cpu", "--data", str(tmp_path), "--out", str(out)],
            "run": ["run", "--steps", "2", "--out", str(out)],
            "ablate": ["ablate", "--preset", "baseline", "--profile", "cpu", "--vary", "optim.matrix_lr=0.04,0.08",
                       "--seeds", "1", "--steps", "2", "--data", str(tmp_path), "--out", str(out)],
            "seeds": ["seeds", "--preset", "baseline", "--profile", "cpu", "--seeds", "1", "--data", str(tmp_path), "--out", str(out)],
            }[command]
    rc, printed, err = _cli(args + ["--tracker", name])
    assert rc == 2 and err.strip().splitlines() == [f"error: --tracker {name}: the {name} package is not installed; "
                                                    f"install it with: pip install -e \".[{name}]\""]
    assert not out.exists() and "training" not in printed


def test_a_failing_tracker_is_reported_once_and_the_run_goes_on(tmp_path):
    warnings = []

    class Broken(tracker_mod.Tracker):
        name = "broken"
        closed = 0

        def _write(self, record, step):
            raise OSError("disk full")

        def _close(self):
            Broken.closed += 1

    t = Broken(tmp_path, warn=warnings.append)
    for step in (1, 2, 3):
        t.record({"event": "train", "step": step, "train_loss": 1.0})
    t.close()
    assert len(warnings) == 1 and "OSError: disk full" in warnings[0] and f"pgolf track {tmp_path}" in warnings[0]
    assert t.failed and Broken.closed == 1


def test_scalars_are_the_numeric_fields_of_an_event():
    record = {"event": "train", "time": 1.5, "step": 7, "train_loss": 2.5, "tokens": 512, "resumable": True, "reason": "x"}
    assert tracker_mod.scalars(record) == {"train/train_loss": 2.5, "train/tokens": 512.0}


def test_track_errors_are_one_line(tmp_path):
    pytest.importorskip("tensorboard")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.txt").write_text("step:1\n")
    rc, _, err = _cli(["track", str(tmp_path / "run"), "--tracker", "tensorboard"])
    assert rc == 2 and "no metrics.jsonl" in err and len(err.strip().splitlines()) == 1
