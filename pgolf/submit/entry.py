"""The entry point of a bundled ``train_gpt.py`` (``pgolf bundle``).

The bundle's launcher installs an importer for its embedded ``pgolf`` sources and calls
:func:`main` with the configuration resolved at bundle time. ``main`` applies the challenge's
environment variables (:mod:`pgolf.config.envvars`), picks the run folder and trains with
``code_bytes`` = the size of the bundled file itself, so the logged totals are the shipped bytes.

Outputs go to ``logs/<RUN_ID>/`` under the current directory (the challenge's scripts also write
``logs/`` and the model into the directory they are started from): ``log.txt``, ``metrics.jsonl``,
``config.json``, ``summary.json`` and the artifact, exactly as ``pgolf train --out`` writes them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pgolf.config import from_dict
from pgolf.config.envvars import apply_env
from pgolf.errors import ConfigError, UserError

LOG_ROOT = "logs"


def code_source() -> str:
    """``bundle`` if every loaded pgolf module came from the bundle's embedded sources, else
    ``package`` (the probe run of ``pgolf bundle`` executes this module from the package)."""
    origins = [getattr(getattr(m, "__spec__", None), "origin", None) or "" for n, m in list(sys.modules.items()) if n.split(".")[0] == "pgolf"]
    return "bundle" if origins and all(o.startswith("bundle:") for o in origins) else "package"


def run_folder(preset: str, seed: int, environ=None) -> Path:
    """``logs/<RUN_ID>``. Without RUN_ID: ``logs/<preset>_seed<seed>``, or the first free
    ``..._2``, ``..._3``. Every torchrun rank calls this before the process group forms, so all
    ranks see the same folders and agree (rank 0 creates the folder only after that)."""
    env = os.environ if environ is None else environ
    run_id = env.get("RUN_ID", "")
    if run_id:
        if Path(run_id).name != run_id or run_id in (".", ".."):
            raise ConfigError(f"RUN_ID={run_id!r} must be a plain folder name (it becomes {LOG_ROOT}/<RUN_ID>)")
        path = Path(LOG_ROOT) / run_id
        if (path / "log.txt").exists():
            raise ConfigError(f"{path} already holds a run (log.txt); choose another RUN_ID or remove the folder")
        return path
    base = f"{preset}_seed{seed}"
    path, n = Path(LOG_ROOT) / base, 1
    while path.exists():
        n += 1
        path = Path(LOG_ROOT) / f"{base}_{n}"
    return path


def in_script_terms(message: str) -> str:
    """A user error as the bundled script's user reads it: settings by the environment variable
    that sets them (``data.path`` -> ``DATA_PATH``), not by pgolf's dotted key."""
    import re

    from pgolf.config.envvars import CHALLENGE_ENV

    names: dict[str, str] = {}
    for env_name, dotted in CHALLENGE_ENV.items():
        names.setdefault(dotted, env_name)  # the first (the challenge's) name of a key
    return re.sub(r"(?<![\w.])(" + "|".join(re.escape(k) for k in sorted(names, key=len, reverse=True)) + r")(?![\w])",
                  lambda m: names[m.group(1)], message)


def main(config: dict, script: str) -> dict:
    """Train the embedded ``config`` (overridden by the environment); ``script`` is the bundled
    file, whose size is the code size counted against the budget."""
    try:
        cfg = from_dict(config)
        applied = apply_env(cfg)
        if not cfg.data.tokenizer:
            raise ConfigError("TOKENIZER_PATH is empty: set it to the SentencePiece .model the shards were made with")
        run_dir = run_folder(cfg.preset, cfg.train.seed)
    except UserError as exc:
        print(f"error: {in_script_terms(str(exc))}", file=sys.stderr)
        raise SystemExit(2) from None
    from pgolf.train.run import run_training

    code_bytes = os.path.getsize(script)
    if os.environ.get("RANK", "0") == "0":
        print(f"code_source:{code_source()} script:{script} code_bytes:{code_bytes} run_dir:{run_dir}", flush=True)
        for name, dotted, value in applied:
            print(f"env_override:{name} {dotted}={value}", flush=True)
    try:
        # The size prediction was printed when the bundle was generated; the script skips it.
        return run_training(cfg, run_dir, code_bytes=code_bytes, predict_size=False)
    except UserError as exc:
        print(f"error: {in_script_terms(str(exc))}", file=sys.stderr)
        raise SystemExit(2) from None
