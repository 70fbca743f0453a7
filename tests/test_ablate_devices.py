"""`pgolf ablate --devices`: cells trained concurrently in child processes (`cpu,cpu` here, the
same code path as one child per GPU), a report equal to the in-process sweep of the same cells and
seeds (training on a CPU is deterministic given the seed), finished cells kept on a rerun without a
child, a failing child reported with its cell and log while the sweep goes on, and the device
list's parsing."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from pgolf.cli import main as cli
from pgolf.submit import ablate
from pgolf.submit.ablate import AblateError, child_env, resolve_devices
from tests.conftest import tiny_set_args

VARY = "optim.matrix_lr=0.04,0.08"
CELLS = ("baseline", "optim.matrix_lr=0.08")
SEEDS = (1337, 42)


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli(args)
    return rc, out.getvalue(), err.getvalue()


def _ablate(demo_dir: Path | None, out: Path, *extra: str, seeds: str = "2") -> list[str]:
    data = ["--data", str(demo_dir)] if demo_dir else []
    return ["ablate", "--preset", "baseline", "--profile", "cpu", *tiny_set_args([("eval.max_val_tokens", 2048)]),
            "--seeds", seeds, "--steps", "3", *data, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def sweeps(demo_dir, tmp_path_factory):
    """The same 2-cell x 2-seed grid in child processes (with a tracker) and in this process."""
    root = tmp_path_factory.mktemp("ablate-devices")
    par = _cli(_ablate(demo_dir, root / "par", "--vary", VARY, "--devices", "cpu,cpu", "--tracker", "tensorboard"))
    seq = _cli(_ablate(demo_dir, root / "seq", "--vary", VARY))
    return {"root": root, "par": par, "seq": seq}


def _report(folder: Path) -> dict:
    return json.loads((folder / "ablation.json").read_text())


@pytest.mark.slow
def test_cells_train_in_child_processes_and_match_the_in_process_sweep(sweeps):
    pytest.importorskip("tensorboard")
    root = sweeps["root"]
    rc, printed, err = sweeps["par"]
    assert rc == 0, err
    assert "cells run in child processes on cpu, cpu" in printed
    for cell in CELLS:
        log = root / "par" / "cells" / cell / "ablate-child.log"
        assert f"[{cell}] started on cpu (pid " in printed and f"log: {log}" in printed
        assert f"[{cell}] done on cpu in " in printed and "2 finished" in printed
        text = log.read_text()
        assert f"pgolf ablate child: cell {cell} on cpu, seeds [1337, 42]" in text and text.count("status:finished") == 2
        for seed in SEEDS:  # each child ran its seeds with the tracker
            assert list((root / "par" / "cells" / cell / f"seed_{seed}" / "tensorboard").glob("events.out.tfevents.*"))
    rc, printed_seq, err = sweeps["seq"]
    assert rc == 0, err
    assert "child" not in printed_seq
    par, seq = _report(root / "par"), _report(root / "seq")
    assert [c["name"] for c in par["cells"]] == [c["name"] for c in seq["cells"]] == list(CELLS)
    for a, b in zip(par["cells"], seq["cells"]):
        assert a["n"] == b["n"] == 2 and a["seeds"] == b["seeds"] == list(SEEDS)
        for key in ("values", "mean", "std", "delta", "p", "roundtrip_mean", "artifact_bytes", "steps"):
            assert a[key] == b[key], key  # bit-identical: same code, same seeds, deterministic on a CPU
        assert "failed" not in a
    assert "--devices cpu,cpu" in par["command"] and "--tracker tensorboard" in par["command"]


@pytest.mark.slow
def test_a_rerun_keeps_finished_cells_without_starting_a_child(sweeps, demo_dir):
    out = sweeps["root"] / "par"
    cells = out / "cells"
    before = {p: p.stat().st_mtime_ns for p in cells.rglob("*") if p.is_file()}
    rc, printed, err = _cli(_ablate(demo_dir, out, "--vary", VARY, "--devices", "cpu,cpu", "--tracker", "tensorboard"))
    assert rc == 0, err
    assert "started on" not in printed and printed.count("already holds this run; kept") == 4
    assert {p: p.stat().st_mtime_ns for p in cells.rglob("*") if p.is_file()} == before
    # the in-process path keeps the same runs: the children wrote the configuration it expects
    rc, printed, err = _cli(_ablate(demo_dir, out, "--vary", VARY, "--devices", "inprocess", "--tracker", "tensorboard"))
    assert rc == 0, err
    assert printed.count("already holds this run; kept") == 4


@pytest.mark.slow
def test_a_failing_child_is_reported_and_the_sweep_goes_on(demo_dir, tmp_path):
    out = tmp_path / "fail"
    missing = tmp_path / "no-such-data"
    rc, printed, err = _cli(_ablate(None, out, "--vary", f"data.path={demo_dir},{missing}", "--devices", "cpu,cpu", seeds="1"))
    assert rc == 1, err
    report = _report(out)
    base, bad = report["cells"]
    assert base["n"] == 1 and base["mean"] is not None and "failed" not in base
    log = Path(bad["folder"]) / "ablate-child.log"
    assert bad["n"] == 0 and str(log) in bad["failed"] and "exited with code 2" in bad["failed"]
    assert str(missing) in bad["failed"]  # the child's error line, quoted in the report
    assert f"[{bad['name']}] FAILED: child process on cpu exited with code 2" in printed and "the sweep goes on" in printed
    assert f"failed: [{bad['name']}]" in printed and str(log) in printed
    assert "error: " in log.read_text()
    row = next(line for line in printed.splitlines() if line.startswith(bad["name"]))
    assert "(child failed)" in row


def test_device_lists(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_devices("auto", {"auto"}) == ["cuda:0", "cuda:1"]
    assert resolve_devices("auto", {"cpu"}) is None  # the cells ask for the CPU: one after another here
    assert resolve_devices("inprocess", {"auto"}) is None
    assert resolve_devices("cuda:1,cuda:0,cuda:1", {"cuda"}) == ["cuda:1", "cuda:0", "cuda:1"]
    assert resolve_devices("cpu,cpu", {"cpu", "auto"}) == ["cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_devices("auto", {"auto"}) is None  # one GPU: in this process, as before
    for spec, cells, message in [("cuda:3", {"auto"}, "cuda:3 is not visible (1 CUDA device(s)); give cuda:0..cuda:0"),
                                 ("gpu0", {"auto"}, "'gpu0' is not a device"),
                                 ("cpu,cpu", {"cuda"}, "a cpu child cannot run cells with train.device=cuda"),
                                 ("cuda:0", {"cpu"}, "the cells have train.device=cpu")]:
        with pytest.raises(AblateError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            resolve_devices(spec, cells)


def test_a_child_sees_only_its_device(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert child_env("cuda:1")["CUDA_VISIBLE_DEVICES"] == "1" and child_env("cpu")["CUDA_VISIBLE_DEVICES"] == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # indices are into what this process sees
    assert child_env("cuda:1")["CUDA_VISIBLE_DEVICES"] == "6"


def test_devices_errors_are_one_line_and_train_nothing(tmp_path):
    rc, _, err = _cli(["ablate", "--preset", "baseline", "--profile", "cpu", "--vary", VARY, "--seeds", "1",
                       "--out", str(tmp_path / "o"), "--devices", "cuda:0"])
    assert rc == 2 and "--devices cuda:0" in err and "train.device=cpu" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_custom_trainer_always_runs_in_this_process(tmp_path, monkeypatch):
    """The planted trainers of test_ablate.py stay in-process whatever --devices says."""
    calls = []

    def trainer(abl, cell):
        calls.append(cell.name)
        return [], []

    monkeypatch.setattr(ablate, "train_in_processes", lambda *a: pytest.fail("no child for a custom trainer"))
    abl = ablate.Ablation("baseline", "cpu", [], [1], tmp_path, ablate.parse_vary([VARY]), devices="cpu,cpu")
    ablate.run_ablation(abl, trainer=trainer)
    assert calls == list(CELLS)
