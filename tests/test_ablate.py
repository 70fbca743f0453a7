"""`pgolf ablate`: a real tiny grid (2 values x 2 seeds, 3 steps) that is interrupted mid-sweep
and resumed, its reports and statistics (equal to `pgolf stats` on the same runs), user errors,
and `--greedy` on planted scores."""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
from pathlib import Path

import pytest

from pgolf.cli import main as cli
from pgolf.submit import ablate
from pgolf.submit.ablate import Option, grid_cells, parse_seed_count
from pgolf.submit.stats import compare, load_sample, mean_std
from tests.conftest import tiny_set_args

VARY = "optim.matrix_lr=0.04,0.08"
CELLS = ("baseline", "optim.matrix_lr=0.08")
SEEDS = (1337, 42)  # what --seeds 2 means


def interrupt_run(monkeypatch, run_index: int) -> None:
    """Make the ``run_index``-th training run of this process (0-based) receive a SIGTERM before
    its second step: it checkpoints step 1, logs ``status:interrupted`` and raises RunInterrupted,
    exactly as a Ctrl-C/SIGTERM does. Other runs are untouched."""
    from pgolf.train import rundir

    started = []

    class StopAtSecondStep(rundir.StopSignals):
        def __init__(self):
            self._reads, self._index = 0, len(started)
            started.append(self)
            super().__init__()

        @property
        def received(self):
            self._reads += 1  # the loop reads the flag once per step
            return signal.SIGTERM if self._index == run_index and self._reads > 1 else None

        @received.setter
        def received(self, value):
            pass

    monkeypatch.setattr(rundir, "StopSignals", StopAtSecondStep)


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli(args)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def sweep(demo_dir, tmp_path_factory):
    """The grid run twice: first interrupted in its third run (the second cell's first seed),
    then the same command again. Returns what each attempt printed and the files' state between."""
    out = tmp_path_factory.mktemp("ablate") / "sweep"
    args = ["ablate", "--preset", "baseline", "--profile", "cpu", *tiny_set_args([("eval.max_val_tokens", 2048)]),
            "--vary", VARY, "--seeds", "2", "--steps", "3", "--data", str(demo_dir), "--out", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        interrupt_run(mp, 2)
        first = _cli(args)
    cells = out / "cells"
    between = {
        "baseline_mtimes": {p: p.stat().st_mtime_ns for s in SEEDS for p in (cells / "baseline" / f"seed_{s}").rglob("*")},
        "interrupted_log": (cells / CELLS[1] / "seed_1337" / "log.txt").read_text(),
        "second_seed_exists": (cells / CELLS[1] / "seed_42").exists(),
        "reports_exist": (out / "ablation.json").exists(),
    }
    second = _cli(args)
    return {"out": out, "first": first, "second": second, "between": between}


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_rerunning_finished_runs(sweep):
    rc, _, err = sweep["first"]
    between = sweep["between"]
    assert rc == 128 + signal.SIGTERM and "rerun the same command to resume" in err
    assert "status:interrupted step:1 resumable:true" in between["interrupted_log"]
    assert not between["second_seed_exists"] and not between["reports_exist"]

    rc, printed, _ = sweep["second"]
    assert rc == 0
    cells = sweep["out"] / "cells"
    # the finished cell's runs were kept: not one of their files was rewritten
    assert between["baseline_mtimes"] and all(p.stat().st_mtime_ns == t for p, t in between["baseline_mtimes"].items())
    assert printed.count("already holds this run; kept") == 2
    assert f"resuming into {cells / CELLS[1] / 'seed_1337'}" in printed
    assert f"training into {cells / CELLS[1] / 'seed_42'}" in printed
    resumed_log = (cells / CELLS[1] / "seed_1337" / "log.txt").read_text()
    assert "status:resumed step:1" in resumed_log and resumed_log.rstrip().endswith("status:finished")
    for cell in CELLS:
        for seed in SEEDS:
            assert (cells / cell / f"seed_{seed}" / "summary.json").is_file()


@pytest.mark.slow
def test_the_table_json_markdown_and_plot(sweep):
    out = sweep["out"]
    _, printed, _ = sweep["second"]
    report = json.loads((out / "ablation.json").read_text())
    assert [c["name"] for c in report["cells"]] == list(CELLS)
    assert report["mode"] == "grid" and report["seeds"] == list(SEEDS)
    assert report["options"] == [{"key": "optim.matrix_lr", "values": ["0.04", "0.08"]}]
    base, other = report["cells"]
    assert base["settings"] == {"optim.matrix_lr": "0.04"} and other["settings"] == {"optim.matrix_lr": "0.08"}
    assert base["n"] == other["n"] == 2 and base["p"] is None and base["delta"] is None
    assert 0.0 <= other["p"] <= 1.0 and other["delta"] == pytest.approx(other["mean"] - base["mean"])
    assert other["metric"] == "roundtrip" and other["roundtrip_mean"] == pytest.approx(other["mean"])
    summaries = [json.loads((Path(r) / "summary.json").read_text()) for r in other["runs"]]
    assert other["artifact_bytes"] == max(s["artifact_bytes"] for s in summaries)
    assert other["tokens_per_second"] == pytest.approx(sum(s["tokens_per_second"] for s in summaries) / 2)
    # the printed table: one row per cell with its mean ± std and Δ
    row = next(line for line in printed.splitlines() if line.startswith(CELLS[1]))
    assert f"{other['mean']:.5f} ± {other['std']:.5f}" in row and f"{other['delta']:+.5f}" in row
    md = (out / "ablation.md").read_text()
    assert f"| {CELLS[1]} | 2 | {other['mean']:.5f} ± {other['std']:.5f}" in md and "![" in md and VARY in md
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_statistics_equal_pgolf_stats_on_the_same_runs(sweep):
    cells = sweep["out"] / "cells"
    report = json.loads((sweep["out"] / "ablation.json").read_text())
    base, other = report["cells"]
    new, ref = load_sample([str(cells / CELLS[1])], "new"), load_sample([str(cells / CELLS[0])], "reference")
    assert (other["mean"], other["std"]) == mean_std(new.val_bpb) and (base["mean"], base["std"]) == mean_std(ref.val_bpb)
    assert other["p"] == compare(new, ref, 0.0)[0].p
    # and what `pgolf stats` prints for them
    rc, printed, _ = _cli(["stats", str(cells / CELLS[1]), "--against", str(cells / CELLS[0]), "--min-gain-nats", "0"])
    assert rc in (0, 1)
    p_printed = float(re.search(r"p = (\S+)", printed).group(1))
    assert other["p"] == pytest.approx(p_printed, rel=1e-3)
    means = re.findall(r"val_bpb\s+mean (\S+)\s+std (\S+)", printed)
    assert [(float(m), float(s)) for m, s in means] == [
        (pytest.approx(other["mean"], abs=1e-8), pytest.approx(other["std"], abs=1e-8)),
        (pytest.approx(base["mean"], abs=1e-8), pytest.approx(base["std"], abs=1e-8))]


def test_grid_cells_and_seed_counts():
    cells = grid_cells([Option("optim.matrix_lr", ("0.04", "0.08")), Option("model.mlp_mult", ("2", "3", "4"))])
    assert len(cells) == 6 and cells[0].name == "baseline"
    assert [c.name for c in cells[1:3]] == ["model.mlp_mult=3", "model.mlp_mult=4"]
    assert cells[-1].name == "optim.matrix_lr=0.08, model.mlp_mult=4"
    assert cells[-1].folder == "optim.matrix_lr=0.08+model.mlp_mult=4"
    assert parse_seed_count("3") == [1337, 42, 2025] and parse_seed_count("5") == [1337, 42, 2025, 1, 2]
    assert parse_seed_count("7,8") == [7, 8]


@pytest.mark.parametrize("extra, message", [
    (["--vary", "optim.matrix_lr=0.04"], "--vary 'optim.matrix_lr=0.04': expected KEY=V1,V2"),
    (["--vary", "train.seed=1,2"], "use --seeds"),
    (["--vary", "optim.matrix_lr=0.04,0.08", "--vary", "optim.matrix_lr=0.1,0.2"], "given twice"),
    (["--vary", "optim.matrix_lr=0.04,0.08", "--set", "optim.matrix_lr=0.1"], "both varied (--vary) and fixed"),
    (["--vary", "optim.no_such_key=1,2"], "no_such_key"),
    (["--vary", "optim.matrix_lr=0.04,0.08", "--seeds", "x"], "--seeds 'x'"),
    (["--vary", "optim.matrix_lr=0.04,0.08", "--steps", "0"], "--steps 0"),
])
def test_user_errors_are_one_line_and_train_nothing(tmp_path, extra, message):
    args = ["ablate", "--preset", "baseline", "--profile", "cpu", "--out", str(tmp_path / "o"), *extra]
    if "--seeds" not in extra:
        args += ["--seeds", "2"]
    rc, _, err = _cli(args)
    assert rc == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# --greedy on planted scores: the trainer writes run folders whose logs carry a chosen score

PLANTED = {  # change from the baseline -> its effect on val_bpb (lower is better)
    ("optim.matrix_lr", "0.08"): -0.050,  # a clear win: kept
    ("optim.matrix_lr", "0.02"): +0.030,
    ("model.mlp_mult", "3"): +0.010,  # a loss: dropped
    ("optim.scalar_lr", "0.02"): -0.004,  # a win smaller than the margin: dropped
}


def _planted_trainer(ablation, cell):
    folder = ablation.cell_dir(cell)
    bpb = 1.2 + sum(PLANTED.get(change, 0.0) for change in ablate.expand_settings(cell.changes))
    runs = []
    for i, seed in enumerate(ablation.seeds):
        run = folder / f"seed_{seed}"
        run.mkdir(parents=True, exist_ok=True)
        value = bpb + (0.0005 if i % 2 else -0.0005)  # seed noise
        (run / "log.txt").write_text(
            "config:" + json.dumps({"preset": "baseline", "train": {"seed": seed}}) + f"\nseed:{seed}\n"
            f"final_int8_zlib_roundtrip_exact val_loss:{value * 1.7:.8f} val_bpb:{value:.8f}\nstatus:finished\n")
        (run / "summary.json").write_text(json.dumps({"val_bpb_roundtrip": value, "artifact_bytes": 1000, "tokens_per_second": 5.0}))
        runs.append(run)
    return runs, []


def test_greedy_keeps_the_winning_change_and_drops_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(ablate, "train_cell", _planted_trainer)
    rc, printed, err = _cli(["ablate", "--preset", "baseline", "--profile", "cpu", "--seeds", "2", "--out", str(tmp_path),
                             "--vary", "optim.matrix_lr=0.04,0.08,0.02", "--vary", "model.mlp_mult=2,3",
                             "--vary", "optim.scalar_lr=0.04,0.02", "--greedy", "--margin", "0.005"])
    assert rc == 0, err
    report = json.loads((tmp_path / "ablation.json").read_text())
    assert report["mode"] == "greedy"
    kept = {d["option"]: d["kept"] for d in report["decisions"]}
    assert kept == {"optim.matrix_lr": "0.08", "model.mlp_mult": None, "optim.scalar_lr": None}
    assert report["selected"] == "optim.matrix_lr=0.08"
    # later options were tried on top of the kept change
    assert [c["name"] for c in report["cells"]] == [
        "baseline", "optim.matrix_lr=0.08", "optim.matrix_lr=0.02",
        "optim.matrix_lr=0.08, model.mlp_mult=3", "optim.matrix_lr=0.08, optim.scalar_lr=0.02"]
    scalar = report["decisions"][2]
    assert scalar["tried"][0]["gain"] == pytest.approx(0.004) and scalar["margin"] == 0.005
    assert "greedy: keep optim.matrix_lr=0.08" in printed
    assert "greedy: drop model.mlp_mult" in printed and "greedy: drop optim.scalar_lr" in printed
    assert "greedy: selected optim.matrix_lr=0.08" in printed
    assert "## Greedy decisions" in (tmp_path / "ablation.md").read_text()


def test_values_with_commas_are_separated_by_semicolons():
    from pgolf.submit.ablate import parse_vary

    (opt,) = parse_vary(["train.seq_len_schedule=256:0;128:0,256:0.5"])
    assert opt.values == ("256:0", "128:0,256:0.5")
    (plain,) = parse_vary(["optim.matrix_lr=0.04,0.08"])
    assert plain.values == ("0.04", "0.08")


def test_tied_keys_change_together_in_every_cell(tmp_path, monkeypatch):
    from pgolf.submit.ablate import Ablation, parse_vary

    options = parse_vary(["model.num_layers+optim.matrix_lr=9+0.04,4+0.08", "optim.scalar_lr=0.04,0.02"])
    assert options[0].key == "model.num_layers+optim.matrix_lr" and len(grid_cells(options)) == 4
    abl = Ablation("baseline", "cpu", [], [1337], tmp_path, options)
    cfgs = {c.name: abl.cell_config(c) for c in grid_cells(options)}
    tied = cfgs["model.num_layers+optim.matrix_lr=4+0.08"]
    assert (tied.model.num_layers, tied.optim.matrix_lr, tied.optim.scalar_lr) == (4, 0.08, 0.04)
    both = cfgs["model.num_layers+optim.matrix_lr=4+0.08, optim.scalar_lr=0.02"]
    assert (both.model.num_layers, both.optim.matrix_lr, both.optim.scalar_lr) == (4, 0.08, 0.02)
    base = cfgs["baseline"]
    assert (base.model.num_layers, base.optim.matrix_lr) == (9, 0.04)

    # the reports give each setting on its own, as --set would
    monkeypatch.setattr(ablate, "train_cell", _planted_trainer)
    rc, printed, err = _cli(["ablate", "--preset", "baseline", "--profile", "cpu", "--seeds", "2", "--out", str(tmp_path / "o"),
                             "--vary", "optim.matrix_lr+model.mlp_mult=0.04+2,0.08+3"])
    assert rc == 0, err
    cells = json.loads((tmp_path / "o" / "ablation.json").read_text())["cells"]
    assert cells[1]["settings"] == {"optim.matrix_lr": "0.08", "model.mlp_mult": "3"}
    assert cells[1]["name"] == "optim.matrix_lr+model.mlp_mult=0.08+3"
    # planted: matrix_lr 0.08 (-0.05) and mlp_mult 3 (+0.01) applied together
    assert cells[1]["mean"] - cells[0]["mean"] == pytest.approx(-0.04)


def test_a_vocabulary_ablation_is_tested_per_byte(tmp_path, monkeypatch):
    """Cells with another tokenizer score the same text in other tokens: the Welch p is on val_bpb
    (a planted 1536 vocabulary: lower bpb, higher loss per token), and the report says so."""
    import math

    def trainer(ablation, cell):
        vocab = dict(ablate.expand_settings(cell.settings))["model.vocab_size"]
        bpn = (0.40 if vocab == "1024" else 0.36) / math.log(2)  # bpb per nat = tokens per byte / ln 2
        runs = []
        for i, seed in enumerate(ablation.seeds):
            bpb = (2.89 if vocab == "1024" else 2.81) + (0.003 if i % 2 else -0.003)
            run = ablation.cell_dir(cell) / f"seed_{seed}"
            run.mkdir(parents=True, exist_ok=True)
            (run / "log.txt").write_text(
                "config:" + json.dumps({"preset": "baseline", "train": {"seed": seed}}) + f"\nseed:{seed}\n"
                f"final_int6_roundtrip_exact val_loss:{bpb / bpn:.8f} val_bpb:{bpb:.8f}\nstatus:finished\n")
            runs.append(run)
        return runs, []

    monkeypatch.setattr(ablate, "train_cell", trainer)
    rc, printed, err = _cli(["ablate", "--preset", "baseline", "--profile", "cpu", "--seeds", "2", "--out", str(tmp_path),
                             "--vary", "data.path+model.vocab_size=/d/sp1024+1024,/d/sp1536+1536"])
    assert rc == 0, err
    cell = json.loads((tmp_path / "ablation.json").read_text())["cells"][1]
    assert cell["welch_metric"] == "val_bpb" and cell["p"] < 0.05 and cell["delta"] == pytest.approx(-0.08)
    assert "tokenise the validation text differently" in (tmp_path / "ablation.md").read_text()


@pytest.mark.parametrize("vary, message", [
    (["optim.matrix_lr+model.mlp_mult=0.04+2,0.08"], "must give 2 values joined by '+'"),
    (["optim.matrix_lr+optim.matrix_lr=1+1,2+2"], "tied keys KEY1+KEY2 must be distinct"),
    (["optim.matrix_lr+model.mlp_mult=0.04+2,0.08+3", "model.mlp_mult=2,4"], "--vary model.mlp_mult: given twice"),
])
def test_tied_key_errors(vary, message):
    from pgolf.submit.ablate import AblateError, parse_vary

    with pytest.raises(AblateError, match=re.escape(message)):
        parse_vary(vary)
