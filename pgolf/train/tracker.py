"""Optional experiment trackers fed from the run's ``metrics.jsonl`` events.

:class:`~pgolf.train.logger.RunLogger` writes every event to ``metrics.jsonl`` and, when a tracker
is attached (``--tracker tensorboard|wandb``), hands the very same record to it: there is one
logging path, and a tracker is a second sink of it. Only rank 0 has an enabled logger, so only rank
0 writes. :func:`replay` feeds an existing ``metrics.jsonl`` through the same adapter afterwards
(``pgolf track``), so a run trained without a tracker can still be looked at in one.

What a record becomes (both trackers): every numeric field ``k`` of an event ``e`` is the scalar
``e/k`` at the event's ``step`` (events without one, such as ``summary``, take the last step seen):
``train/train_loss``, ``train/lr_scale``, ``train/tokens``, ``val/val_bpb``, ``summary/val_bpb_roundtrip``,
``summary/artifact_bytes``, ... The ``config`` event becomes the tracker's configuration (text in
TensorBoard), ``status`` events a text entry (TensorBoard) or the run summary's ``status`` (W&B).

* ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` into ``RUN_DIR/tensorboard/``
  (``tensorboard --logdir RUN_DIR`` or a folder of runs).
* ``wandb``: an offline run (never touches the network) in ``RUN_DIR/wandb/offline-run-*``;
  upload it later with ``wandb sync RUN_DIR/wandb/offline-run-*``. The project is ``$WANDB_PROJECT``
  or ``pgolf``; the run's name is the run folder.

The packages are optional extras (``pip install -e ".[tensorboard]"`` / ``".[wandb]"``);
:func:`require_tracker` fails with that line before anything is trained. A tracker that fails
while a run is going is closed and reported once in ``log.txt``; training and ``metrics.jsonl`` go
on (replay them later).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from pgolf.errors import MissingDependencyError, UserError

TRACKERS = ("tensorboard", "wandb")
# the module each tracker needs -> the extra of pyproject.toml that installs it
_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}
FOLDERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # inside the run folder
_SKIP = ("event", "time", "step")


class TrackerError(UserError):
    """A tracker name or replay that cannot be used."""


def require_tracker(name: str | None) -> None:
    """Pre-flight: the tracker's package imports (MissingDependencyError naming the extra if not)."""
    if name is None:
        return
    if name not in TRACKERS:
        raise TrackerError(f"--tracker {name}: unknown tracker; choose one of {', '.join(TRACKERS)}")
    try:
        importlib.import_module(_MODULES[name])
    except ImportError:
        raise MissingDependencyError(f"--tracker {name}: the {name} package is not installed; "
                                     f"install it with: pip install -e \".[{name}]\"") from None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of one metrics record as ``event/key`` scalars (booleans left out)."""
    event = record.get("event", "event")
    return {f"{event}/{k}": float(v) for k, v in record.items()
            if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """One run's sink: :meth:`record` takes each metrics record, :meth:`close` flushes. A failure
    disables the tracker (reported once through ``warn``) instead of stopping the run."""

    name = "tracker"

    def __init__(self, run_dir: Path, warn=None):
        self.run_dir = Path(run_dir)
        self.step = 0
        self.failed = False
        self._warn = warn or (lambda msg: None)

    def record(self, record: dict[str, Any]) -> None:
        if self.failed:
            return
        step = record.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            self.step = step
        try:
            self._write(record, self.step)
        except Exception as exc:  # noqa: BLE001 - a tracker never stops training; metrics.jsonl has it all
            self.failed = True
            self._warn(f"tracker:{self.name} failed ({type(exc).__name__}: {str(exc)[:200]}); it writes nothing more; "
                       f"metrics.jsonl is complete: replay it with `pgolf track {self.run_dir} --tracker {self.name}`")
            try:
                self._close()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        if not self.failed:
            self._close()

    def _write(self, record: dict[str, Any], step: int) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path, warn=None):
        super().__init__(run_dir, warn)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.run_dir / FOLDERS["tensorboard"]))

    def _write(self, record: dict[str, Any], step: int) -> None:
        event = record.get("event")
        if event == "config":
            self.writer.add_text("config", "```\n" + json.dumps(record.get("config", {}), indent=2, sort_keys=True, default=str) + "\n```", step)
            self.writer.add_text("env", "```\n" + json.dumps(record.get("env", {}), indent=2, default=str) + "\n```", step)
            return
        if event == "status":
            self.writer.add_text("status", f"{record.get('status')} at step {step}", step)
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        if event in ("val", "status", "summary"):
            self.writer.flush()

    def _close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """An offline W&B run, started at the first record (the ``config`` event gives its config)."""

    name = "wandb"

    def __init__(self, run_dir: Path, warn=None):
        super().__init__(run_dir, warn)
        import wandb

        self._wandb = wandb
        self.run = None
        self._last_logged = -1

    def _start(self, config: dict[str, Any] | None) -> None:
        wandb = self._wandb
        self.run_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", silent=True, disable_git=True, save_code=False, disable_job_creation=True)
        self.run = wandb.init(mode="offline", dir=str(self.run_dir), project=os.environ.get("WANDB_PROJECT", "pgolf"),
                              name=str(self.run_dir), config=config or {}, settings=settings)

    def _write(self, record: dict[str, Any], step: int) -> None:
        event = record.get("event")
        if self.run is None:
            config = None
            if event == "config":
                config = dict(record.get("config") or {})
                config["env"] = record.get("env", {})
            self._start(config)
            if event == "config":
                return
        elif event == "config":  # a resumed session in the same run: keep the first configuration
            return
        if event == "status":
            self.run.summary["status"] = record.get("status")
        values = scalars(record)
        if event == "summary":
            self.run.summary.update({k: v for k, v in record.items() if k not in _SKIP})
        if not values:
            return
        # W&B drops a step lower than one already logged: steps a resumed run repeats (the same
        # values: resume is exact) are left out
        if step < self._last_logged:
            return
        self._last_logged = step
        self.run.log(values, step=step)

    def _close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def open_tracker(name: str, run_dir: str | Path, warn=None) -> Tracker:
    require_tracker(name)
    cls = TensorBoardTracker if name == "tensorboard" else WandbTracker
    return cls(Path(run_dir), warn)


def replay(run_dir: str | Path, name: str, overwrite: bool = False) -> tuple[int, Path]:
    """Feed ``run_dir/metrics.jsonl`` into tracker ``name`` (into the run folder, as a live run
    would); returns (records fed, the tracker's folder). Refuses a folder that already holds the
    tracker's output unless ``overwrite`` (then replaced)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise TrackerError(f"{run_dir}: no metrics.jsonl; give run folders written by pgolf train / run / ablate")
    folder = run_dir / FOLDERS[name]
    if folder.exists():
        if not overwrite:
            raise TrackerError(f"{folder} exists (written live or by an earlier replay); pass --overwrite to replace it")
        shutil.rmtree(folder)
    lines = metrics.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines):
                break  # a last line cut short by a kill
            raise TrackerError(f"{metrics}:{i}: not a JSON line; the file is damaged") from None
    problems: list[str] = []
    tracker = open_tracker(name, run_dir, warn=problems.append)
    try:
        for record in records:
            tracker.record(record)
    finally:
        tracker.close()
    if problems:
        raise TrackerError(f"{run_dir}: {problems[0]}")
    return len(records), folder
