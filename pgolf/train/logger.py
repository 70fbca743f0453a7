"""Self-describing run outputs: ``log.txt`` (human ``key:value`` lines, the challenge's final-line
names) and ``metrics.jsonl`` (one JSON object per event), written by rank 0 only. An attached tracker
(:mod:`pgolf.train.tracker`) receives the same records.

The log opens with the resolved config, library versions and hardware, so a log file alone says
what produced it.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch


def environment_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    from importlib import metadata

    for mod in ("numpy", "sentencepiece", "zstandard", "brotli", "constriction"):
        # The installed distribution's version: some modules (constriction) have no __version__,
        # which used to be reported as "absent" while the library was installed and in use.
        try:
            info[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            try:
                info[mod] = str(getattr(__import__(mod), "__version__", "installed"))
            except ImportError:
                info[mod] = "absent"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
    try:
        import pgolf

        info["pgolf"] = pgolf.__version__
    except Exception:  # noqa: BLE001
        pass
    return info


class RunLogger:
    """Writes to ``run_dir/log.txt`` and ``run_dir/metrics.jsonl`` when ``enabled`` (rank 0)."""

    def __init__(self, run_dir: Path | None, enabled: bool = True, echo: bool = True):
        self.enabled = enabled and run_dir is not None
        self.echo = echo and enabled
        self.run_dir = run_dir
        self.t0 = time.time()
        self.tracker = None  # pgolf.train.tracker: gets every metrics record too (rank 0 only)
        if self.enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(run_dir / "log.txt", "a", encoding="utf-8")
            self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def log(self, msg: str, console: bool = True) -> None:
        if self.echo and console:
            print(msg, flush=True)
        if self.enabled:
            self._log.write(msg + "\n")
            self._log.flush()

    def metric(self, event: str, **values: Any) -> None:
        if self.enabled:
            record = {"event": event, "time": round(time.time() - self.t0, 3), **values}
            line = json.dumps(record, default=float)
            self._metrics.write(line + "\n")
            self._metrics.flush()
            if self.tracker:
                self.tracker.record(json.loads(line))  # exactly the line written

    def header(self, config: dict[str, Any], env: dict[str, Any]) -> None:
        self.log("=" * 100, console=False)
        self.log("config:" + json.dumps(config, sort_keys=True), console=False)
        for k, v in env.items():
            self.log(f"env_{k}:{v}", console=False)
        self.log("=" * 100, console=False)
        self.metric("config", config=config, env=env)

    def close(self) -> None:
        if self.tracker:
            self.tracker.close()
        if self.enabled:
            self._log.close()
            self._metrics.close()
