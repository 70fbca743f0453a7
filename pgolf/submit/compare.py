"""Reading run folders side by side: ``pgolf compare RUN...`` and ``pgolf runs DIR``.

A run folder (``pgolf train``, ``pgolf seeds``, ``pgolf ablate``) holds ``config.json``,
``log.txt`` (ending with a ``status:`` line), ``metrics.jsonl`` and, once finished,
``summary.json`` and the artifact. Everything here only reads those files, so it works on a run
that is still going, was killed, or was copied from another machine.

Status of a run (:func:`run_status`), from the strongest evidence to the weakest:

* the log's last ``status:`` line: ``finished``, ``interrupted`` (SIGINT/SIGTERM, checkpointed),
  ``diverged`` or ``failed``; ``status:resumed`` is a start, not an end, so it counts as none;
* with no ending status line: ``running`` when the log was written in the last
  :data:`RUNNING_WINDOW_S` seconds, else ``unknown`` (a SIGKILL or a lost machine leaves no line);
* ``summary.json`` without a status line (an older log) counts as finished.

Whatever the status, the newest *complete* checkpoint (:func:`pgolf.train.checkpoint.list_checkpoints`)
is reported: it is the step ``pgolf train --resume`` (and ``pgolf seeds``/``ablate``) continue from.
"""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pgolf.errors import UserError
from pgolf.submit.record import SeedRun, _curves, config_differences
from pgolf.submit.stats import parse_log

RUNNING_WINDOW_S = 600.0  # a training log is written at least this often while a run is alive
_GLOB_CHARS = set("*?[")


class CompareError(UserError):
    """Run folders that cannot be found or read."""


@dataclass
class RunInfo:
    """What one run folder says about its run (None where it says nothing)."""

    path: str
    status: str  # finished | interrupted | diverged | failed | running | unknown
    resume_step: int | None  # newest complete checkpoint's step
    preset: str | None = None
    profile: str | None = None
    seed: int | None = None
    steps: int | None = None
    iterations: int | None = None
    train_seconds: float | None = None
    tokens_per_second: float | None = None
    val_bpb_prequant: float | None = None
    val_bpb_roundtrip: float | None = None
    val_bpb_sliding: float | None = None
    val_bpb_ttt: float | None = None
    artifact_bytes: int | None = None
    settings: dict[str, Any] | None = None  # filled by compare: the differing settings' values

    @property
    def resumable(self) -> bool:
        return self.status != "finished" and self.resume_step is not None

    def status_text(self) -> str:
        if self.status == "finished" or self.resume_step is None:
            return self.status
        return f"{self.status}, resumable @{self.resume_step}"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent or half-written: the caller falls back to the log
    return data if isinstance(data, dict) else None


def last_status(log_text: str) -> str | None:
    """The word after the log's last ending ``status:`` line (``resumed`` is a start, not an end)."""
    status = None
    for line in log_text.splitlines():
        if line.startswith("status:"):
            word = line[len("status:"):].split(" ", 1)[0].strip()
            status = None if word == "resumed" else word
    return status


def newest_complete_checkpoint(run_dir: Path) -> int | None:
    from pgolf.train.checkpoint import list_checkpoints

    complete = [c.step for c in list_checkpoints(run_dir) if c.complete]
    return max(complete) if complete else None


def run_status(run_dir: str | Path, *, now: float | None = None) -> tuple[str, int | None]:
    """(status, newest complete checkpoint step or None) of a run folder; see the module docstring."""
    run_dir = Path(run_dir)
    log = run_dir / "log.txt"
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    status = last_status(text)
    if status is None:
        if (run_dir / "summary.json").is_file():
            status = "finished"
        else:
            newest = max((p.stat().st_mtime for p in (log, run_dir / "metrics.jsonl") if p.is_file()), default=None)
            alive = newest is not None and (now if now is not None else time.time()) - newest < RUNNING_WINDOW_S
            status = "running" if alive else "unknown"
    return status, newest_complete_checkpoint(run_dir)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "config.json").is_file() or (path / "log.txt").is_file())


def find_runs(root: str | Path) -> list[Path]:
    """Run folders at or under ``root``, sorted; never looks inside a run folder (checkpoints)."""
    root = Path(root)
    if not root.is_dir():
        raise CompareError(f"{root}: not a folder; give a folder that holds run folders")
    found: list[Path] = []
    for dirpath, dirnames, _files in os.walk(root):
        here = Path(dirpath)
        if is_run_dir(here):
            found.append(here)
            dirnames.clear()
        else:
            dirnames.sort()
    return sorted(found)


def expand_run_args(items: list[str]) -> list[Path]:
    """Run folders named by ``items``: folders, globs, or folders of run folders (an ablation's
    or a seed series' ``--out``), in the order given, each once."""
    out: list[Path] = []
    for item in items:
        if _GLOB_CHARS & set(item):
            matches = sorted(Path(p) for p in glob.glob(item))
            if not matches:
                raise CompareError(f"{item!r} matches nothing; check the pattern (quote it so the shell does not expand it)")
            paths = matches
        else:
            paths = [Path(item)]
        for p in paths:
            if not p.exists():
                raise CompareError(f"{p}: no such folder; give run folders (log.txt, config.json) or a folder of them")
            found = [p] if is_run_dir(p) else find_runs(p) if p.is_dir() else []
            if not found:
                raise CompareError(f"{p}: neither a run folder (log.txt / config.json) nor a folder holding any")
            out += [f for f in found if f not in out]
    return out


def read_run(run_dir: str | Path) -> RunInfo:
    """Status, recipe and scores of one run folder: ``summary.json`` when the run finished, the
    log's lines otherwise (a run still going has its steps and no scores)."""
    run_dir = Path(run_dir)
    status, resume_step = run_status(run_dir)
    info = RunInfo(str(run_dir), status, resume_step)
    config = _read_json(run_dir / "config.json")
    facts = parse_log(run_dir / "log.txt") if (run_dir / "log.txt").is_file() else None
    if config is None and facts is not None:
        config = facts.config
    if config:
        info.preset, info.profile = config.get("preset"), config.get("profile")
        info.seed = config.get("train", {}).get("seed")
        info.iterations = config.get("train", {}).get("iterations")
    if facts is not None:
        info.steps, info.train_seconds = facts.steps, facts.train_seconds
        info.iterations = facts.iterations or info.iterations
        info.artifact_bytes = facts.total_bytes
        for name, (_loss, bpb) in facts.finals.items():
            for kind, attr in (("roundtrip", "val_bpb_roundtrip"), ("sliding_window", "val_bpb_sliding"), ("ttt", "val_bpb_ttt")):
                if name.endswith(kind):
                    setattr(info, attr, bpb)
    summary = _read_json(run_dir / "summary.json")
    if summary:
        for key in ("steps", "train_seconds", "tokens_per_second", "val_bpb_prequant", "val_bpb_roundtrip",
                    "val_bpb_sliding", "val_bpb_ttt", "artifact_bytes", "seed", "preset", "profile"):
            if summary.get(key) is not None:
                setattr(info, key, summary[key])
    return info


def config_of(run_dir: str | Path) -> dict[str, Any] | None:
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json")
    if config is None and (run_dir / "log.txt").is_file():
        config = parse_log(run_dir / "log.txt").config
    return config


def _lookup(config: dict[str, Any] | None, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def differing_settings(configs: list[dict[str, Any] | None]) -> list[str]:
    """``section.key`` names whose values differ between any of the runs (seed excluded; data
    paths compared by what they name)."""
    known = [c for c in configs if c]
    keys: set[str] = set()
    for other in known[1:]:
        keys.update(config_differences(known[0], other))
    return sorted(keys)


def compare_runs(run_dirs: list[Path]) -> tuple[list[RunInfo], list[str]]:
    """The runs' facts with, in ``settings``, each run's value of every setting that differs."""
    infos = [read_run(d) for d in run_dirs]
    configs = [config_of(d) for d in run_dirs]
    keys = differing_settings(configs)
    for info, config in zip(infos, configs):
        info.settings = {k: _lookup(config, k) for k in keys}
    return infos, keys


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain text table, columns left-aligned and padded to their widest cell."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compare_table(infos: list[RunInfo], keys: list[str]) -> str:
    header = ["run", "preset", *keys, "seed", "steps", "tok/s", "pre-quant", "round-trip", "sliding", "ttt", "artifact bytes", "status"]
    rows = []
    for i in infos:
        rows.append([i.path, f"{_fmt(i.preset)}/{_fmt(i.profile)}", *(json.dumps(i.settings.get(k)) for k in keys),
                     _fmt(i.seed), _fmt(i.steps), _fmt(i.tokens_per_second, ",.0f"), _fmt(i.val_bpb_prequant, ".5f"),
                     _fmt(i.val_bpb_roundtrip, ".5f"), _fmt(i.val_bpb_sliding, ".5f"), _fmt(i.val_bpb_ttt, ".5f"),
                     _fmt(i.artifact_bytes, ","), i.status_text()])
    note = "settings that differ between the runs: " + (", ".join(keys) if keys else "none (seed aside)")
    return format_table(header, rows) + "\n" + note


def runs_table(infos: list[RunInfo], root: Path) -> str:
    header = ["run", "status", "resume step", "preset", "steps", "round-trip val_bpb"]
    rows = []
    for i in infos:
        rel = os.path.relpath(i.path, root)
        steps = f"{_fmt(i.steps)}/{_fmt(i.iterations)}" if i.status != "finished" else _fmt(i.steps)
        rows.append([rel, i.status, _fmt(i.resume_step), f"{_fmt(i.preset)}/{_fmt(i.profile)}", steps,
                     _fmt(i.val_bpb_roundtrip, ".5f")])
    return format_table(header, rows)


def infos_json(infos: list[RunInfo]) -> list[dict[str, Any]]:
    return [{**asdict(i), "resumable": i.resumable} for i in infos]


def loss_curves(run_dir: str | Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train_loss) and (step, val_loss) of a run: metrics.jsonl, else the log's lines
    (the same reader as a record's plot)."""
    run_dir = Path(run_dir)
    log = run_dir / "log.txt"
    facts = parse_log(log) if log.is_file() else None
    if facts is None:
        from pgolf.submit.stats import LogFacts

        facts = LogFacts(str(log))
    metrics = run_dir / "metrics.jsonl"
    return _curves(SeedRun(run_dir, facts, metrics if metrics.is_file() else None))


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure atomically (temporary file + rename) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def plot_compare(infos: list[RunInfo], path: str | Path, title: str = "training loss") -> None:
    """Every run's training loss (lines) and validation loss (dots) against the step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for info in infos:
        train, val = loss_curves(info.path)
        settings = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in (info.settings or {}).items())
        label = f"{Path(info.path).name}" + (f" ({settings})" if settings else "")
        if not train and not val:
            continue
        line = ax.plot([s for s, _ in train], [v for _, v in train], lw=1.2, label=label)[0]
        if val:
            ax.plot([s for s, _ in val], [v for _, v in val], "o", color=line.get_color(), ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, Path(path))
