"""``pgolf ablate``: settings tested against a recipe with seeds and statistics.

Each ``--vary KEY=V1,V2,...`` is an *option*; its first value is the baseline. A *cell* is one
value per option; it is trained once per seed, one run after another, into
``OUT/cells/<cell>/seed_<seed>/`` through :func:`pgolf.submit.seeds.run_seeds`, so a rerun of the
same command keeps finished runs, resumes interrupted ones from their newest complete checkpoint
and refuses a folder that holds another configuration. A cell's folder is named by its changes
from the baseline (``baseline``, ``optim.matrix_lr=0.02``, ...), so the grid and ``--greedy``
share finished cells.

* Tied keys: ``--vary KEY1+KEY2=A1+A2,B1+B2`` changes several settings together, one value of
  each per alternative (a tokenizer: ``data.path+model.vocab_size=/d/sp1024+1024,/d/sp1536+1536``;
  a width with its learning rate). The option counts as one; each value sets every key.
* Grid (default): the cartesian product of the options' values, the all-baseline cell first.
* ``--greedy``: forward selection as the best record's authors ran it. Start from the baseline;
  for each option in the order given, train each of its other values on top of what has been kept
  so far, and keep the best one when it lowers the mean score by more than ``--margin`` bpb.
  Every decision is printed and recorded in ``ablation.json``.

Per cell: n, mean and sample std of the score (the val_bpb of each run's score line, exactly what
``pgolf stats`` reports: legal TTT, else sliding window, else round trip), the round-trip and
sliding val_bpb separately, artifact bytes and tokens/s; against the first cell the difference and
the p-value of the one-sided Welch test of :func:`pgolf.submit.stats.compare` (H1: the cell beats
the first cell by more than ``--min-gain-nats``, default 0), i.e. ``pgolf stats CELL/seed_*
--against FIRST/seed_* --min-gain-nats 0``. A run that diverges is counted, not averaged, and the
sweep goes on (a diverging learning rate is a result); rerunning does not retry it.

Where cells run (``--devices``, :func:`resolve_devices`): by default (``auto``) one after another
in this process, on the device the configuration names; when more than one CUDA device is visible
(and the cells do not ask for ``train.device=cpu``), concurrently, one child process per device,
each seeing only its own device (``CUDA_VISIBLE_DEVICES``). A child trains its cell's seeds with
the same code as the in-process path (:func:`train_seeds`) into the same cell folder, so keeping
finished runs and resuming interrupted ones work the same; its output goes to
``OUT/cells/<cell>/ablate-child.log``. A child that fails is reported with the cell and that log,
and the sweep goes on (the cell counts the runs it finished). ``--devices cpu,cpu`` runs CPU
children (for tests, or a machine with several sockets). ``--greedy`` runs each round's
alternatives concurrently. Outputs:
``ablation.json``, ``ablation.md`` and ``ablation.png`` (val_bpb per cell with error bars, and the
training loss curves), all written atomically.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pgolf.config import RunConfig, load_config, parse_set_args
from pgolf.errors import UserError
from pgolf.submit.compare import format_table, loss_curves, run_status, save_figure
from pgolf.submit.stats import DEFAULT_ALPHA, SCORE_PREFERENCE, StatsError, compare, load_sample, mean_std, parse_log

FIRST_SEEDS = (1337, 42, 2025)  # the challenge's customary seeds; more are numbered from 1
BASELINE = "baseline"


class AblateError(UserError):
    """An ablation that cannot run as asked."""


@dataclass(frozen=True)
class Option:
    key: str
    values: tuple[str, ...]  # as typed; the first is the baseline


@dataclass(frozen=True)
class Cell:
    settings: tuple[tuple[str, str], ...]  # (key, value) for every option, in option order
    baseline: tuple[tuple[str, str], ...]

    @property
    def changes(self) -> list[tuple[str, str]]:
        base = dict(self.baseline)
        return [(k, v) for k, v in self.settings if base[k] != v]

    @property
    def name(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.changes) or BASELINE

    @property
    def folder(self) -> str:
        # File-system safe and stable: the same settings always map to the same folder. Values
        # with other characters get a hash of the exact name, so two of them never share one.
        plain = self.name.replace(", ", "+")
        safe = re.sub(r"[^A-Za-z0-9._=+-]+", "_", plain)[:120]
        return safe if safe == plain else f"{safe}-{hashlib.sha1(plain.encode()).hexdigest()[:8]}"


def parse_vary(items: list[str]) -> list[Option]:
    options: list[Option] = []
    for item in items:
        key, sep, raw = item.partition("=")
        # Values that contain commas themselves (a schedule "128:0,256:0.5", a list "[0.99,0.999]")
        # are separated by ";" instead: when a ";" is present it is the separator.
        values = tuple(v.strip() for v in raw.split(";" if ";" in raw else ",") if v.strip())
        if not sep or not key.strip() or len(values) < 2:
            raise AblateError(f"--vary {item!r}: expected KEY=V1,V2[,...] (or KEY=V1;V2;... when values contain commas) "
                              "with at least two values (the first is the baseline)")
        key = key.strip()
        keys = option_keys(key)
        if "train.seed" in keys:
            raise AblateError("--vary train.seed: seeds are not a setting to ablate; use --seeds")
        if len(keys) > 1:
            if not all(keys) or len(set(keys)) != len(keys):
                raise AblateError(f"--vary {item!r}: tied keys KEY1+KEY2 must be distinct and non-empty")
            bad = [v for v in values if len(v.split(TIE)) != len(keys)]
            if bad:
                raise AblateError(f"--vary {item!r}: value {bad[0]!r} must give {len(keys)} values joined by "
                                  f"'{TIE}', one for each of {', '.join(keys)}")
        if len(set(values)) != len(values):
            raise AblateError(f"--vary {item!r}: a value repeats; give each value once")
        for o in options:
            shared = set(option_keys(o.key)) & set(keys)
            if shared:
                k = sorted(shared)[0]
                raise AblateError(f"--vary {k}: given twice; put all its values in one --vary {k}=V1,V2,...")
        options.append(Option(key, values))
    if not options:
        raise AblateError("give at least one --vary KEY=V1,V2")
    return options


TIE = "+"  # joins the keys of a tied option and the values of each of its alternatives


def option_keys(key: str) -> list[str]:
    """The settings an option's key names: ``a.b`` -> [a.b]; ``a.b+c.d`` (tied) -> [a.b, c.d]."""
    return [k.strip() for k in key.split(TIE)]


def expand_settings(settings: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A cell's (option key, value) pairs as the (setting, value) pairs they set: a tied option's
    value gives each of its keys its own part."""
    out: list[tuple[str, str]] = []
    for key, value in settings:
        keys = option_keys(key)
        parts = value.split(TIE) if len(keys) > 1 else [value]
        assert len(parts) == len(keys), (key, value)
        out.extend((k, v.strip()) for k, v in zip(keys, parts))
    return out


def parse_seed_count(text: str) -> list[int]:
    """``--seeds``: a count N (the customary 1337, 42, 2025, then 1, 2, ...) or a comma-separated list."""
    from pgolf.submit.seeds import parse_seeds

    text = text.strip()
    if "," in text:
        return parse_seeds(text)
    if not text.isdigit() or int(text) < 1:
        raise AblateError(f"--seeds {text!r}: give a count (e.g. 3) or a comma-separated list (e.g. 1337,42)")
    n = int(text)
    return list(FIRST_SEEDS[:n]) + list(range(1, n - len(FIRST_SEEDS) + 1))


def baseline_cell(options: list[Option]) -> Cell:
    base = tuple((o.key, o.values[0]) for o in options)
    return Cell(base, base)


def with_value(cell: Cell, key: str, value: str) -> Cell:
    return Cell(tuple((k, value if k == key else v) for k, v in cell.settings), cell.baseline)


def grid_cells(options: list[Option]) -> list[Cell]:
    base = baseline_cell(options).settings
    return [Cell(tuple(zip((o.key for o in options), values)), base) for values in itertools.product(*(o.values for o in options))]


@dataclass
class Ablation:
    """What every cell shares; ``cell_config`` adds the cell's settings on top."""

    preset: str
    profile: str | None
    overrides: list[tuple[str, Any]]  # --set, --data, --steps/--seconds
    seeds: list[int]
    out: Path
    options: list[Option]
    min_gain_nats: float = 0.0
    results: dict[str, "CellResult"] = field(default_factory=dict)  # by cell name, in run order
    tracker: str | None = None  # every run's metrics also to tensorboard / wandb (pgolf.train.tracker)
    devices: str = "auto"  # --devices: where cells run (resolve_devices)

    def cell_config(self, cell: Cell) -> RunConfig:
        set_keys = {k for k, _ in self.overrides}
        settings = expand_settings(cell.settings)
        clash = [k for k, _ in settings if k in set_keys]
        if clash:
            raise AblateError(f"{clash[0]} is both varied (--vary) and fixed (--set/--steps/--seconds); keep it in --vary only")
        return load_config(self.preset, self.profile, self.overrides + parse_set_args([f"{k}={v}" for k, v in settings]))

    def cell_dir(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.folder


@dataclass
class CellResult:
    cell: Cell
    folder: Path
    finished: list[Path]  # seed folders with a score
    diverged: list[Path]
    stats: dict[str, Any]  # the JSON cell (name, settings, n, mean, std, p, ...)
    failure: str | None = None  # a child process that failed: its exit code and log

    @property
    def mean(self) -> float | None:
        return self.stats.get("mean")


def train_cell(ablation: Ablation, cell: Cell) -> tuple[list[Path], list[Path]]:
    """Train one cell once per seed in this process (kept / resumed / new as :func:`run_seeds`
    decides); returns (finished seed folders, diverged ones)."""
    return train_seeds(ablation.cell_config(cell), cell.name, ablation.cell_dir(cell), ablation.seeds, ablation.tracker)


def train_seeds(cfg: RunConfig, name: str, folder: Path, seeds: list[int], tracker: str | None = None) -> tuple[list[Path], list[Path]]:
    """A cell's seeds, one after another: what :func:`train_cell` runs in this process and a child
    process of :func:`train_in_processes` runs on its device. A divergence ends that seed, not the sweep."""
    from pgolf.submit.seeds import run_seeds, seed_dir
    from pgolf.train.loop import TrainingDivergedError

    finished, diverged = [], []
    for seed in seeds:
        run_dir = seed_dir(folder, seed)
        if run_dir.is_dir() and run_status(run_dir)[0] == "diverged":
            print(f"[{name}] seed {seed}: diverged in an earlier attempt; not retried", flush=True)
            diverged.append(run_dir)
            continue
        try:
            print(f"[{name}]", end=" ", flush=True)
            run_seeds(cfg, [seed], folder, tracker=tracker)
        except TrainingDivergedError as exc:
            print(f"[{name}] seed {seed}: {exc}", flush=True)
            diverged.append(run_dir)
            continue
        finished.append(run_dir)
    return finished, diverged


# ------------------------------------------------------------------------------------------------
# cells in child processes, one per device

CHILD_LOG = "ablate-child.log"
_CHILD_SPEC = ".ablate-child.json"
_CHILD_CODE = "import sys; from pgolf.submit.ablate import child_main; sys.exit(child_main(sys.argv[1]))"


def resolve_devices(spec: str | None, train_devices: set[str]) -> list[str] | None:
    """``--devices``: None = the cells one after another in this process; else one child process per
    entry (``cuda:N`` or ``cpu``; an entry given twice runs two cells there at once). ``auto``: every
    visible CUDA device when there are more than one and no cell asks for ``train.device=cpu``.
    ``inprocess``: this process, whatever is visible. ``train_devices``: the cells' ``train.device``."""
    spec = (spec or "auto").strip()
    if spec in ("auto", "inprocess"):
        if spec == "inprocess" or "cpu" in train_devices:
            return None
        import torch

        count = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(count)] if count > 1 else None
    devices = [d.strip() for d in spec.split(",")]
    count = None
    for d in devices:
        if d == "cpu":
            if "cuda" in train_devices:
                raise AblateError(f"--devices {spec}: a cpu child cannot run cells with train.device=cuda; "
                                  "set train.device=auto (or cpu) or give cuda:N devices")
            continue
        m = re.fullmatch(r"cuda:(\d+)", d)
        if not m:
            raise AblateError(f"--devices {spec}: {d!r} is not a device; give auto, inprocess, or a comma-separated "
                              "list of cuda:N and cpu (e.g. cuda:0,cuda:1)")
        if "cpu" in train_devices:
            raise AblateError(f"--devices {spec}: the cells have train.device=cpu and would not use {d}; "
                              "set train.device=auto (or cuda) or pass --devices cpu,...")
        if count is None:
            import torch

            count = torch.cuda.device_count()
        if int(m.group(1)) >= count:
            fix = f"give cuda:0..cuda:{count - 1}" if count else "use --devices auto or cpu"
            raise AblateError(f"--devices {spec}: {d} is not visible ({count} CUDA device(s)); {fix}")
    return devices


def child_env(device: str) -> dict[str, str]:
    """The environment of a child on ``device``: it sees that device only (cuda:0 inside it)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        index = int(device.split(":")[1])
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)
    return env


def _settle(cfg: RunConfig, folder: Path, seeds: list[int]) -> tuple[list[Path], list[Path], list[int]]:
    """(finished, diverged, seeds still to train) of a cell, read from its folder; SeedsError for a
    seed folder that holds another configuration."""
    from pgolf.submit.seeds import run_mode, seed_dir

    finished, diverged, todo = [], [], []
    for seed in seeds:
        run_dir = seed_dir(folder, seed)
        run_cfg = copy.deepcopy(cfg)
        run_cfg.train.seed = seed
        if run_dir.is_dir() and run_status(run_dir)[0] == "diverged":
            diverged.append(run_dir)
        elif run_mode(run_dir, run_cfg) is None:
            finished.append(run_dir)
        else:
            todo.append(seed)
    return finished, diverged, todo


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def train_in_processes(ablation: Ablation, cells: list[Cell], devices: list[str]) -> dict[str, tuple[list[Path], list[Path], str | None]]:
    """Train ``cells`` concurrently, one child process per entry of ``devices`` at a time; returns
    by cell name (finished, diverged, failure). Cells whose seeds are all settled start no child.
    SIGINT/SIGTERM are passed on to the children (each checkpoints and stops); RunInterrupted once
    they have all ended."""
    from pgolf.config import to_dict
    from pgolf.quant.container import write_bytes_atomic
    from pgolf.train.loop import RunInterrupted

    configs = {c.name: ablation.cell_config(c) for c in cells}
    settled = {c.name: _settle(configs[c.name], ablation.cell_dir(c), ablation.seeds) for c in cells}  # pre-flight
    outcome: dict[str, tuple[list[Path], list[Path], str | None]] = {}
    queue = []
    for cell in cells:
        finished, diverged, todo = settled[cell.name]
        if todo:
            queue.append(cell)
            continue
        for run_dir in finished:
            print(f"[{cell.name}] {run_dir} already holds this run; kept", flush=True)
        for run_dir in diverged:
            print(f"[{cell.name}] {run_dir}: diverged in an earlier attempt; not retried", flush=True)
        outcome[cell.name] = (finished, diverged, None)

    free = list(range(len(devices)))
    running: dict[int, tuple[Cell, subprocess.Popen, Any, float]] = {}
    stop: list[int] = []

    def forward(signum, frame):  # every signal to every child: the first checkpoints, a second stops at once
        stop.append(signum)
        for _cell, proc, _log, _t in running.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {}
    if queue and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
    try:
        while queue or running:
            while queue and free and not stop:
                cell, slot = queue.pop(0), free.pop(0)
                folder = ablation.cell_dir(cell)
                folder.mkdir(parents=True, exist_ok=True)
                spec = {"name": cell.name, "folder": str(folder), "seeds": ablation.seeds, "tracker": ablation.tracker,
                        "device": devices[slot], "config": to_dict(configs[cell.name])}
                write_bytes_atomic(folder / _CHILD_SPEC, json.dumps(spec, default=str).encode())
                log = open(folder / CHILD_LOG, "a", encoding="utf-8")
                log.write(f"==== pgolf ablate child: cell {cell.name} on {devices[slot]}, seeds {ablation.seeds}, "
                          f"{_dt.datetime.now().isoformat(timespec='seconds')} ====\n")
                log.flush()
                # a session of its own: a Ctrl-C reaches the children once, passed on by forward()
                proc = subprocess.Popen([sys.executable, "-c", _CHILD_CODE, str(folder / _CHILD_SPEC)], stdout=log,
                                        stderr=subprocess.STDOUT, env=child_env(devices[slot]), start_new_session=True)
                running[slot] = (cell, proc, log, time.perf_counter())
                print(f"[{cell.name}] started on {devices[slot]} (pid {proc.pid}); log: {folder / CHILD_LOG}", flush=True)
            time.sleep(0.1)
            for slot, (cell, proc, log, t0) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del running[slot]
                free.append(slot)
                finished, diverged, todo = _settle(configs[cell.name], ablation.cell_dir(cell), ablation.seeds)
                path = ablation.cell_dir(cell) / CHILD_LOG
                failure = None
                if rc != 0 and not stop:
                    failure = f"child process on {devices[slot]} exited with code {rc}: {_last_line(path)} (log: {path})"
                    print(f"[{cell.name}] FAILED: {failure}; the sweep goes on", flush=True)
                else:
                    print(f"[{cell.name}] {'stopped' if stop else 'done'} on {devices[slot]} in {time.perf_counter() - t0:.1f} s: "
                          f"{len(finished)} finished" + (f", {len(diverged)} diverged" if diverged else ""), flush=True)
                outcome[cell.name] = (finished, diverged, failure)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop:
        raise RunInterrupted(None, stop[0])
    return outcome


def child_main(spec_path: str) -> int:
    """The child process of :func:`train_in_processes`: train one cell's seeds (:func:`train_seeds`)."""
    from pgolf.config import from_dict
    from pgolf.train.loop import RunInterrupted

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    try:
        train_seeds(from_dict(spec["config"]), spec["name"], Path(spec["folder"]), list(spec["seeds"]), spec.get("tracker"))
    except UserError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    except RunInterrupted as exc:
        print(f"interrupted at step {exc.step}; checkpoint saved", flush=True)
        return 128 + (exc.signum or signal.SIGINT)
    return 0


def _mean_std_or_none(values: list[float | None]) -> tuple[float | None, float | None]:
    if not values or any(v is None for v in values):
        return None, None
    return mean_std([float(v) for v in values])


def _score_kind(score_name: str | None) -> str:
    """``final_int6_sliding_window`` -> ``sliding_window``; the kinds ``pgolf stats`` prefers."""
    return next((k for k in SCORE_PREFERENCE if score_name and score_name.endswith(k)), score_name or "?")


def summarize_cell(cell: Cell, folder: Path, finished: list[Path], diverged: list[Path], failure: str | None = None) -> dict[str, Any]:
    """The cell's statistics from its run folders; the score comes from :func:`load_sample`, the
    reader of ``pgolf stats``, so the two always agree. ``failure``: why a child process failed."""
    out: dict[str, Any] = {"name": cell.name, "settings": dict(expand_settings(cell.settings)), "folder": str(folder),
                           "runs": [str(p) for p in finished], "n": len(finished), "diverged": len(diverged),
                           "metric": None, "mean": None, "std": None, "values": [], "val_loss_mean": None}
    if failure:
        out["failed"] = failure
    if not finished:
        return out
    sample = load_sample(finished, cell.name)
    facts = [parse_log(p / "log.txt") for p in finished]
    kinds = {_score_kind(f.score_name) for f in facts}
    summaries = [json.loads((p / "summary.json").read_text(encoding="utf-8")) if (p / "summary.json").is_file() else {}
                 for p in finished]
    out["metric"] = "/".join(sorted(kinds))
    out["mean"], out["std"] = mean_std(sample.val_bpb)
    out["values"] = list(sample.val_bpb)
    out["seeds"] = list(sample.seeds)
    if sample.val_loss:
        out["val_loss_mean"] = mean_std(sample.val_loss)[0]
    for kind in ("roundtrip", "sliding", "ttt", "prequant"):
        mean, std = _mean_std_or_none([s.get(f"val_bpb_{kind}") for s in summaries])
        out[f"{kind}_mean"], out[f"{kind}_std"] = mean, std
    out["artifact_bytes"] = max((s.get("artifact_bytes") or 0 for s in summaries), default=0) or None
    out["tokens_per_second"] = _mean_std_or_none([s.get("tokens_per_second") for s in summaries])[0]
    out["steps"] = _mean_std_or_none([s.get("steps") for s in summaries])[0]
    out["_sample"] = sample  # for the Welch test; dropped before writing
    return out


def welch_against_first(cell: dict[str, Any], reference: dict[str, Any], min_gain_nats: float) -> None:
    """Fill ``delta`` (bpb, negative = better) and ``p`` (one-sided Welch, as ``pgolf stats``)."""
    cell["delta"] = cell["p"] = cell["p_note"] = None
    if cell is reference:
        return
    if cell["mean"] is None or reference["mean"] is None:
        cell["p_note"] = "no finished runs on one side"
        return
    cell["delta"] = cell["mean"] - reference["mean"]
    try:
        result, note = compare(cell["_sample"], reference["_sample"], min_gain_nats, DEFAULT_ALPHA)
    except StatsError as exc:  # fewer than 2 seeds on a side
        cell["p_note"] = str(exc)
        return
    cell["p"], cell["welch_metric"], cell["welch_t"], cell["welch_dof"] = result.p, result.metric, result.t, result.dof
    cell["p_note"] = note or None  # e.g. two tokenizers: the test is on val_bpb


def evaluate(ablation: Ablation, cell: Cell, trainer: Callable[[Ablation, Cell], tuple[list[Path], list[Path]]] | None = None) -> CellResult:
    """Train (or reuse) a cell and compute its statistics; memoised per cell within one sweep."""
    return evaluate_all(ablation, [cell], trainer)[0]


def evaluate_all(ablation: Ablation, cells: list[Cell], trainer=None, pool: list[str] | None = None) -> list[CellResult]:
    """Train (or reuse) ``cells``, then compute their statistics in the order given; memoised per
    cell within one sweep. With a ``pool`` of devices (and no custom ``trainer``) the cells train
    concurrently in child processes (:func:`train_in_processes`), else one after another here."""
    todo = [c for i, c in enumerate(cells) if c.name not in ablation.results and c.name not in {d.name for d in cells[:i]}]
    if pool and trainer is None and todo:
        trained = train_in_processes(ablation, todo, pool)
    else:  # one at a time, each scored before the next trains (as before: a crash keeps what is done)
        trained = None
    for cell in todo:
        if trained is not None:
            finished, diverged, failure = trained[cell.name]
        else:
            (finished, diverged), failure = (trainer or train_cell)(ablation, cell), None
        result = CellResult(cell, ablation.cell_dir(cell), finished, diverged,
                            summarize_cell(cell, ablation.cell_dir(cell), finished, diverged, failure), failure)
        ablation.results[cell.name] = result
        first = next(iter(ablation.results.values()))
        welch_against_first(result.stats, first.stats, ablation.min_gain_nats)
    return [ablation.results[c.name] for c in cells]


def run_grid(ablation: Ablation, trainer=None, pool: list[str] | None = None) -> list[CellResult]:
    cells = grid_cells(ablation.options)
    for cell in cells:  # pre-flight: every cell's configuration is valid before anything trains
        ablation.cell_config(cell)
    return evaluate_all(ablation, cells, trainer, pool)


def run_greedy(ablation: Ablation, margin: float, trainer=None, pool: list[str] | None = None) -> list[dict[str, Any]]:
    """Forward selection (see the module docstring); returns the decisions, also printed. With a
    ``pool``, each round's alternatives train concurrently."""
    current = baseline_cell(ablation.options)
    for option in ablation.options:  # pre-flight: each single change is a valid configuration
        for value in option.values[1:]:
            ablation.cell_config(with_value(current, option.key, value))
    (best,) = evaluate_all(ablation, [current], trainer, pool)
    if best.mean is None:
        raise AblateError(f"the baseline cell has no finished run ({best.folder}); fix it before a greedy sweep")
    decisions = []
    for option in ablation.options:
        tried = evaluate_all(ablation, [with_value(current, option.key, v) for v in option.values[1:]], trainer, pool)
        scored = [t for t in tried if t.mean is not None]
        winner = min(scored, key=lambda t: t.mean) if scored else None
        gain = None if winner is None else best.mean - winner.mean
        keep = gain is not None and gain > margin
        decision = {
            "option": option.key, "from": dict(current.settings)[option.key], "base": best.cell.name, "base_mean": best.mean,
            "tried": [{"value": dict(t.cell.settings)[option.key], "cell": t.cell.name, "mean": t.mean, "n": t.stats["n"],
                       "gain": None if t.mean is None else best.mean - t.mean} for t in tried],
            "kept": dict(winner.cell.settings)[option.key] if keep else None, "margin": margin,
        }
        if keep:
            verdict = f"keep {option.key}={decision['kept']}: {best.mean:.6f} -> {winner.mean:.6f} (gain {gain:.6f} > margin {margin})"
            current, best = winner.cell, winner
        elif winner is None:
            verdict = f"drop {option.key}: no alternative finished a run"
        else:
            verdict = (f"drop {option.key}: best alternative {dict(winner.cell.settings)[option.key]} gives "
                       f"{winner.mean:.6f} vs {best.mean:.6f} (gain {gain:.6f} <= margin {margin})")
        decision["decision"] = verdict
        decisions.append(decision)
        print(f"greedy: {verdict}", flush=True)
    print(f"greedy: selected {current.name} (mean {best.mean:.6f})", flush=True)
    return decisions


# ------------------------------------------------------------------------------------------------
# reporting


def _pm(mean: float | None, std: float | None) -> str:
    return "-" if mean is None else f"{mean:.5f} ± {std:.5f}"


def table_rows(cells: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    sliding = any(c.get("sliding_mean") is not None for c in cells)
    ttt = any(c.get("ttt_mean") is not None for c in cells)
    metrics = sorted({c["metric"] for c in cells if c["metric"]})
    roundtrip = metrics != ["roundtrip"]  # a separate round-trip column only when the score is another line
    header = ["cell", "n", f"score ({'/'.join(metrics) or '-'}) mean ± std"] + ["round-trip mean ± std"] * roundtrip
    header += ["sliding mean ± std"] * sliding + ["ttt mean ± std"] * ttt
    header += ["Δ vs first", "p (Welch, 1-sided)", "artifact bytes", "tok/s"]
    rows = []
    for c in cells:
        n = f"{c['n']}" + (f" (+{c['diverged']} diverged)" if c["diverged"] else "") + (" (child failed)" if c.get("failed") else "")
        row = [c["name"], n, _pm(c["mean"], c["std"])] + [_pm(c.get("roundtrip_mean"), c.get("roundtrip_std"))] * roundtrip
        row += [_pm(c.get("sliding_mean"), c.get("sliding_std"))] * sliding + [_pm(c.get("ttt_mean"), c.get("ttt_std"))] * ttt
        row += ["-" if c.get("delta") is None else f"{c['delta']:+.5f}", "-" if c.get("p") is None else f"{c['p']:.3g}",
                "-" if not c.get("artifact_bytes") else f"{c['artifact_bytes']:,}",
                "-" if c.get("tokens_per_second") is None else f"{c['tokens_per_second']:,.0f}"]
        rows.append(row)
    return header, rows


def text_table(cells: list[dict[str, Any]]) -> str:
    return format_table(*table_rows(cells))


def markdown(report: dict[str, Any], plot_name: str) -> str:
    header, rows = table_rows(report["cells"])
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(r) + " |" for r in rows])
    lines = [f"# Ablation: {report['preset']} / {report['profile']}", "", f"{report['created']}. Command:", "",
             "```bash", report["command"], "```", "",
             f"Seeds {', '.join(map(str, report['seeds']))}; {report['budget']}. Score: each run's score line "
             "(as `pgolf stats`); p: one-sided Welch test that the cell beats the first cell by more than "
             f"{report['min_gain_nats']} nats (lower is better).", "", table, ""]
    notes = [f"- `{c['name']}`: {c['p_note']}" for c in report["cells"] if c.get("p_note")]
    if notes:
        lines += ["Notes on the tests:", ""] + notes + [""]
    if report.get("decisions"):
        lines += ["## Greedy decisions", ""] + [f"- {d['decision']}" for d in report["decisions"]]
        lines += ["", f"Selected: `{report['selected']}`", ""]
    lines += [f"![val_bpb per cell and training loss]({plot_name})", ""]
    return "\n".join(lines)


def plot(results: list[CellResult], path: Path, title: str) -> None:
    """Left: each cell's mean score with its std as error bar and each seed as a dot. Right:
    every seed's training loss curve, coloured by cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bpb, ax_loss) = plt.subplots(1, 2, figsize=(13, 5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(results):
        color = colors[i % len(colors)]
        s = r.stats
        if s["mean"] is not None:
            ax_bpb.errorbar([i], [s["mean"]], yerr=[s["std"]], fmt="o", color=color, capsize=5, ms=7)
            ax_bpb.plot([i] * len(s["values"]), s["values"], ".", color=color, alpha=0.5)
        for j, run in enumerate(r.finished + r.diverged):
            train, _val = loss_curves(run)
            ax_loss.plot([a for a, _ in train], [b for _, b in train], color=color, lw=1, alpha=0.8,
                         label=r.cell.name if j == 0 else None)
    ax_bpb.set_xlim(-0.5, len(results) - 0.5)
    ax_bpb.set_xticks(range(len(results)))
    ax_bpb.set_xticklabels([r.cell.name for r in results], rotation=30, ha="right", fontsize=7)
    ax_bpb.set_ylabel("val_bpb (score line), mean ± std")
    ax_bpb.grid(alpha=0.3)
    ax_loss.xaxis.get_major_locator().set_params(integer=True)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (nats)")
    ax_loss.grid(alpha=0.3)
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def write_report(ablation: Ablation, results: list[CellResult], *, command: str, budget: str,
                 decisions: list[dict[str, Any]] | None = None, selected: str | None = None) -> dict[str, Any]:
    """ablation.json, ablation.md and ablation.png under OUT; returns the JSON report."""
    from pgolf.quant.container import write_bytes_atomic

    cells = [{k: v for k, v in r.stats.items() if not k.startswith("_")} for r in results]
    report = {
        "preset": ablation.preset, "profile": ablation.profile, "command": command, "budget": budget,
        "created": _dt.datetime.now().isoformat(timespec="seconds"), "seeds": ablation.seeds,
        "mode": "greedy" if decisions is not None else "grid", "min_gain_nats": ablation.min_gain_nats,
        "options": [{"key": o.key, "values": list(o.values)} for o in ablation.options],
        "fixed_settings": {k: v for k, v in ablation.overrides},
        "cells": cells,
    }
    if decisions is not None:
        report["decisions"], report["selected"] = decisions, selected
    ablation.out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(ablation.out / "ablation.json", (json.dumps(report, indent=2, default=str) + "\n").encode())
    write_bytes_atomic(ablation.out / "ablation.md", markdown(report, "ablation.png").encode())
    plot(results, ablation.out / "ablation.png", f"{ablation.preset}/{ablation.profile}: {len(results)} cells × {len(ablation.seeds)} seeds")
    return report


def run_ablation(ablation: Ablation, *, greedy: bool = False, margin: float = 0.0, command: str = "", budget: str = "",
                 trainer=None) -> dict[str, Any]:
    """Run the grid (or the greedy selection), print the table and write the reports. Where the
    cells train: ``ablation.devices`` (:func:`resolve_devices`); a custom ``trainer`` always runs
    in this process."""
    ablation = copy.copy(ablation)
    ablation.results = {}
    if ablation.tracker:
        from pgolf.train.tracker import require_tracker

        require_tracker(ablation.tracker)  # a missing package fails before any cell trains
    pool = None
    if trainer is None:
        base = baseline_cell(ablation.options)  # the baseline and each single change: every train.device a cell can have
        cells = [base] + [with_value(base, o.key, v) for o in ablation.options for v in o.values[1:]]
        pool = resolve_devices(ablation.devices, {ablation.cell_config(c).train.device for c in cells})
        if pool:
            print(f"cells run in child processes on {', '.join(pool)} (one cell per device at a time)", flush=True)
    decisions = selected = None
    if greedy:
        decisions = run_greedy(ablation, margin, trainer, pool)
        selected = _selected_name(decisions, ablation)
        results = list(ablation.results.values())  # every cell the selection trained, in order
    else:
        results = run_grid(ablation, trainer, pool)
    failed = [r for r in results if r.failure]
    print()
    print(text_table([r.stats for r in results]))
    for r in failed:
        print(f"failed: [{r.cell.name}] {r.failure}")
    report = write_report(ablation, results, command=command, budget=budget, decisions=decisions, selected=selected)
    print(f"\nwrote {ablation.out / 'ablation.json'}, ablation.md, ablation.png")
    return report


def _selected_name(decisions: list[dict[str, Any]], ablation: Ablation) -> str:
    cell = baseline_cell(ablation.options)
    for d in decisions:
        if d["kept"] is not None:
            cell = with_value(cell, d["option"], d["kept"])
    return cell.name
