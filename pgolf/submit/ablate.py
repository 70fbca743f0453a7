"""``pgolf ablate``: settings tested against a recipe with seeds and statistics.

Each ``--vary KEY=V1,V2,...`` is an *option*; its first value is the baseline. A *cell* is one
value per option; it is trained once per seed, one run after another, into
``OUT/cells/<cell>/seed_<seed>/`` through :func:`pgolf.submit.seeds.run_seeds`, so a rerun of the
same command keeps finished runs, resumes interrupted ones from their newest complete checkpoint
and refuses a folder that holds another configuration. A cell's folder is named by its changes
from the baseline (``baseline``, ``optim.matrix_lr=0.02``, ...), so the grid and ``--greedy``
share finished cells.

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

Cells run one after another in this process, on the device the configuration names. Outputs:
``ablation.json``, ``ablation.md`` and ``ablation.png`` (val_bpb per cell with error bars, and the
training loss curves), all written atomically.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import itertools
import json
import re
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
        if key == "train.seed":
            raise AblateError("--vary train.seed: seeds are not a setting to ablate; use --seeds")
        if len(set(values)) != len(values):
            raise AblateError(f"--vary {item!r}: a value repeats; give each value once")
        if any(o.key == key for o in options):
            raise AblateError(f"--vary {key}: given twice; put all its values in one --vary {key}=V1,V2,...")
        options.append(Option(key, values))
    if not options:
        raise AblateError("give at least one --vary KEY=V1,V2")
    return options


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

    def cell_config(self, cell: Cell) -> RunConfig:
        set_keys = {k for k, _ in self.overrides}
        clash = [k for k, _ in cell.settings if k in set_keys]
        if clash:
            raise AblateError(f"{clash[0]} is both varied (--vary) and fixed (--set/--steps/--seconds); keep it in --vary only")
        return load_config(self.preset, self.profile, self.overrides + parse_set_args([f"{k}={v}" for k, v in cell.settings]))

    def cell_dir(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.folder


@dataclass
class CellResult:
    cell: Cell
    folder: Path
    finished: list[Path]  # seed folders with a score
    diverged: list[Path]
    stats: dict[str, Any]  # the JSON cell (name, settings, n, mean, std, p, ...)

    @property
    def mean(self) -> float | None:
        return self.stats.get("mean")


def train_cell(ablation: Ablation, cell: Cell) -> tuple[list[Path], list[Path]]:
    """Train one cell once per seed (kept / resumed / new as :func:`run_seeds` decides); returns
    (finished seed folders, diverged ones). A divergence ends that seed, not the sweep."""
    from pgolf.submit.seeds import run_seeds, seed_dir
    from pgolf.train.loop import TrainingDivergedError

    cfg = ablation.cell_config(cell)
    folder = ablation.cell_dir(cell)
    finished, diverged = [], []
    for seed in ablation.seeds:
        run_dir = seed_dir(folder, seed)
        if run_dir.is_dir() and run_status(run_dir)[0] == "diverged":
            print(f"[{cell.name}] seed {seed}: diverged in an earlier attempt; not retried", flush=True)
            diverged.append(run_dir)
            continue
        try:
            print(f"[{cell.name}]", end=" ", flush=True)
            run_seeds(cfg, [seed], folder)
        except TrainingDivergedError as exc:
            print(f"[{cell.name}] seed {seed}: {exc}", flush=True)
            diverged.append(run_dir)
            continue
        finished.append(run_dir)
    return finished, diverged


def _mean_std_or_none(values: list[float | None]) -> tuple[float | None, float | None]:
    if not values or any(v is None for v in values):
        return None, None
    return mean_std([float(v) for v in values])


def _score_kind(score_name: str | None) -> str:
    """``final_int6_sliding_window`` -> ``sliding_window``; the kinds ``pgolf stats`` prefers."""
    return next((k for k in SCORE_PREFERENCE if score_name and score_name.endswith(k)), score_name or "?")


def summarize_cell(cell: Cell, folder: Path, finished: list[Path], diverged: list[Path]) -> dict[str, Any]:
    """The cell's statistics from its run folders; the score comes from :func:`load_sample`, the
    reader of ``pgolf stats``, so the two always agree."""
    out: dict[str, Any] = {"name": cell.name, "settings": dict(cell.settings), "folder": str(folder),
                           "runs": [str(p) for p in finished], "n": len(finished), "diverged": len(diverged),
                           "metric": None, "mean": None, "std": None, "values": [], "val_loss_mean": None}
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
        result, _note = compare(cell["_sample"], reference["_sample"], min_gain_nats, DEFAULT_ALPHA)
    except StatsError as exc:  # fewer than 2 seeds on a side
        cell["p_note"] = str(exc)
        return
    cell["p"], cell["welch_metric"], cell["welch_t"], cell["welch_dof"] = result.p, result.metric, result.t, result.dof


def evaluate(ablation: Ablation, cell: Cell, trainer: Callable[[Ablation, Cell], tuple[list[Path], list[Path]]] | None = None) -> CellResult:
    """Train (or reuse) a cell and compute its statistics; memoised per cell within one sweep."""
    if cell.name in ablation.results:
        return ablation.results[cell.name]
    finished, diverged = (trainer or train_cell)(ablation, cell)
    result = CellResult(cell, ablation.cell_dir(cell), finished, diverged,
                        summarize_cell(cell, ablation.cell_dir(cell), finished, diverged))
    ablation.results[cell.name] = result
    first = next(iter(ablation.results.values()))
    welch_against_first(result.stats, first.stats, ablation.min_gain_nats)
    return result


def run_grid(ablation: Ablation, trainer=None) -> list[CellResult]:
    cells = grid_cells(ablation.options)
    for cell in cells:  # pre-flight: every cell's configuration is valid before anything trains
        ablation.cell_config(cell)
    return [evaluate(ablation, cell, trainer) for cell in cells]


def run_greedy(ablation: Ablation, margin: float, trainer=None) -> list[dict[str, Any]]:
    """Forward selection (see the module docstring); returns the decisions, also printed."""
    current = baseline_cell(ablation.options)
    for option in ablation.options:  # pre-flight: each single change is a valid configuration
        for value in option.values[1:]:
            ablation.cell_config(with_value(current, option.key, value))
    best = evaluate(ablation, current, trainer)
    if best.mean is None:
        raise AblateError(f"the baseline cell has no finished run ({best.folder}); fix it before a greedy sweep")
    decisions = []
    for option in ablation.options:
        tried = [evaluate(ablation, with_value(current, option.key, v), trainer) for v in option.values[1:]]
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
        n = f"{c['n']}" + (f" (+{c['diverged']} diverged)" if c["diverged"] else "")
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
    """Run the grid (or the greedy selection), print the table and write the reports."""
    ablation = copy.copy(ablation)
    ablation.results = {}
    decisions = selected = None
    if greedy:
        decisions = run_greedy(ablation, margin, trainer)
        selected = _selected_name(decisions, ablation)
        results = list(ablation.results.values())  # every cell the selection trained, in order
    else:
        results = run_grid(ablation, trainer)
    print()
    print(text_table([r.stats for r in results]))
    report = write_report(ablation, results, command=command, budget=budget, decisions=decisions, selected=selected)
    print(f"\nwrote {ablation.out / 'ablation.json'}, ablation.md, ablation.png")
    return report


def _selected_name(decisions: list[dict[str, Any]], ablation: Ablation) -> str:
    cell = baseline_cell(ablation.options)
    for d in decisions:
        if d["kept"] is not None:
            cell = with_value(cell, d["option"], d["kept"])
    return cell.name
