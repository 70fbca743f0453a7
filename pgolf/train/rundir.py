"""Run folders that never mix two runs, and signals that stop a run cleanly.

A run folder is created only after every pre-flight check has passed (config, data, tokenizer,
manifest, writability), so a failed check leaves nothing behind. An existing folder is refused
unless the user asks for ``--overwrite`` (the old folder is removed as a whole first) or
``--resume`` (the same run continues from its newest complete checkpoint). ``summary.json`` is
written last, atomically: a folder without it is visibly unfinished, and ``log.txt`` /
``metrics.jsonl`` end with a ``status`` event that says how the run ended.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

from pgolf.errors import UserError

RUN_MODES = ("new", "overwrite", "resume")
SUMMARY = "summary.json"


class RunFolderError(UserError):
    """An --out folder that cannot be used as asked."""


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_run_dir(run_dir: Path, mode: str) -> None:
    """Pre-flight: refuse what would mix runs or fail later; writes nothing."""
    assert mode in RUN_MODES
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} is a file, not a run folder; choose another --out")
    populated = run_dir.is_dir() and any(run_dir.iterdir())
    if mode == "new" and populated:
        what = "a finished run" if (run_dir / SUMMARY).exists() else "files (an unfinished or interrupted run?)"
        raise RunFolderError(f"{run_dir} already holds {what}; pass --overwrite to replace it, "
                             f"`pgolf train --resume {run_dir}` to continue it, or choose another --out")
    if mode == "resume":
        if not (run_dir / "config.json").is_file():
            raise RunFolderError(f"{run_dir} is not a pgolf run folder (no config.json); nothing to resume")
        if (run_dir / SUMMARY).exists():
            raise RunFolderError(f"{run_dir} is a finished run ({SUMMARY} exists); nothing to resume")
    anchor = _nearest_existing(run_dir)
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise RunFolderError(f"{run_dir}: cannot write there ({anchor} is not writable); choose another --out")


def prepare_run_dir(run_dir: Path, mode: str) -> None:
    """Rank 0, after the pre-flight checks: create (or replace) the folder and prove it writable."""
    try:
        if mode == "overwrite" and run_dir.exists():
            # Move the old run aside first, so a crash while deleting never leaves a mix of two runs.
            trash = run_dir.with_name(f".{run_dir.name}.old-{os.getpid()}")
            os.replace(run_dir, trash)
            shutil.rmtree(trash, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RunFolderError(f"{run_dir}: cannot write the run folder ({exc.strerror}); choose another --out") from None


class StopSignals:
    """SIGINT / SIGTERM become a request that the loop honours at the next step boundary (with a
    checkpoint); a second signal interrupts at once. A no-op outside the main thread."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # second signal: stop now
            self.__exit__(None, None, None)
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
