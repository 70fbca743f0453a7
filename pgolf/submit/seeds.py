"""Runs of a configuration: seed series and probe runs.

* ``pgolf seeds``: the same configuration trained once per seed, one full run after another, into
  ``OUT/seed_<seed>/``; then the per-seed statistics (and the Welch test with ``--against``). A seed
  folder that already holds a finished run of the same configuration is kept, so an interrupted
  series resumes; a folder holding anything else is an error (never overwritten).
* Probe runs, for ``pgolf bundle`` and ``pgolf audit``: the configuration shrunk to seconds on a
  CPU (narrower, 2 steps, 64-token sequences, tiny synthetic data) with every technique switch as
  configured, run in a clean subprocess.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pgolf.config import RunConfig, get_value, to_dict
from pgolf.config.envvars import CHALLENGE_ENV, NON_CONFIG_PGOLF_VARS, PREFIX, env_name
from pgolf.errors import UserError
from pgolf.submit.record import config_differences


class SeedsError(UserError):
    """A seed series that cannot run."""


class RunError(UserError):
    """A probe or verification subprocess that failed."""


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SeedsError(f"--seeds {text!r}: expected comma-separated integers, e.g. 1337,42,2025") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SeedsError(f"--seeds {text!r}: give distinct seeds, e.g. 1337,42,2025")
    return seeds


def seed_dir(out: Path, seed: int) -> Path:
    return Path(out) / f"seed_{seed}"


def run_mode(run_dir: Path, cfg: RunConfig) -> str | None:
    """How to (re)run one seed's folder: None when it already holds this finished run, ``resume``
    when it holds this run interrupted with a complete checkpoint, ``overwrite`` when it holds this
    run interrupted before any checkpoint, ``new`` when it is empty or absent. SeedsError when it
    holds a run of another configuration (never overwritten)."""
    from pgolf.train.checkpoint import list_checkpoints

    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "new"
    config = run_dir / "config.json"
    if not config.is_file():
        raise SeedsError(f"{run_dir} holds files that are not a pgolf run; choose another --out or remove it")
    saved = json.loads(config.read_text(encoding="utf-8"))
    diff = config_differences(saved, to_dict(cfg))
    if diff or saved.get("train", {}).get("seed") != cfg.train.seed:
        raise SeedsError(f"{run_dir} holds a run of another configuration ({', '.join(diff) or 'train.seed'}); "
                         "choose another --out or remove it")
    if (run_dir / "summary.json").is_file():
        return None
    return "resume" if any(c.complete for c in list_checkpoints(run_dir)) else "overwrite"


def finished(run_dir: Path, cfg: RunConfig) -> bool:
    """True if ``run_dir`` holds a finished run of ``cfg``; SeedsError if it holds something else."""
    return run_mode(run_dir, cfg) is None


def run_seeds(cfg: RunConfig, seeds: list[int], out: str | Path, tracker: str | None = None) -> list[Path]:
    """Train ``cfg`` once per seed, sequentially (each a full run); returns the run folders.
    Finished seeds are kept, interrupted ones resume from their newest complete checkpoint.
    ``tracker``: as :func:`pgolf.train.run.run_training`."""
    from pgolf.train.run import run_training

    dirs = []
    for i, seed in enumerate(seeds):
        run_cfg = copy.deepcopy(cfg)
        run_cfg.train.seed = seed
        run_dir = seed_dir(Path(out), seed)
        mode = run_mode(run_dir, run_cfg)
        if mode is None:
            print(f"seed {seed}: {run_dir} already holds this run; kept", flush=True)
        else:
            verb = {"new": "training", "resume": "resuming", "overwrite": "restarting (no checkpoint)"}[mode]
            print(f"seed {seed} ({i + 1}/{len(seeds)}): {verb} into {run_dir}", flush=True)
            run_training(run_cfg, run_dir, mode=mode, tracker=tracker)
        dirs.append(run_dir)
    return dirs


# ------------------------------------------------------------------------------------------------
# probe runs: a configuration shrunk to seconds, in a subprocess


def probe_overrides(cfg: RunConfig) -> dict[str, Any]:
    """Settings that shrink a run to seconds on a CPU without changing which code it uses:
    narrower (same heads, depth and technique switches), 2 steps, 64-token sequences."""
    m = cfg.model
    head_dim = max(2 * m.rope_dims, 16) if m.rope_dims > 0 else 16  # keeps partial RoPE partial
    accum = max(cfg.train.grad_accum_base, 1)
    out: dict[str, Any] = {
        "model.model_dim": m.num_heads * head_dim,
        "model.attention_backend": "sdpa" if m.attention_backend == "flash3" else m.attention_backend,
        "train.device": "cpu", "train.compile": "off", "train.threads": 1,
        "train.autocast": "off",  # bf16 on a CPU pays kernel set-up for every new shape
        "train.iterations": 2, "train.max_wallclock_seconds": 0, "train.warmup_steps": 0,
        "train.train_seq_len": 64, "train.train_batch_tokens": 64 * accum,
        "train.val_loss_every": 0, "train.train_log_every": 1,
        "eval.eval_seq_len": 64 if cfg.eval.eval_seq_len else 0, "eval.sliding_stride": 16 if cfg.eval.sliding_stride else 0,
        "eval.max_val_tokens": 1024, "eval.val_batch_tokens": 1024,
    }
    # Components with cost knobs of their own, when this checkout has them.
    for dotted, value in (("ttt.chunk_tokens", 256), ("ttt.batch_seqs", 2), ("quant.gptq_calib_seqs", 2)):
        try:
            get_value(cfg, dotted)
        except UserError:
            continue
        out[dotted] = value
    return out


def make_probe_data(folder: Path, vocab_size: int, transform: str = "none") -> tuple[Path, Path]:
    """A tiny data folder (random-token shards, a real BPE tokenizer trained on synthetic words).
    With ``transform`` = the CaseOps one (``data.transform``), the folder is made by the real
    pipeline (``pgolf.data.prepare``: operator pieces, manifest naming the transform, byte
    sidecars) from synthetic words with some capitals, so the probe runs the transform's code."""
    from pgolf.data.shards import write_shard
    from pgolf.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"]
    docs = [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(200))
            for _ in range(300 * -(-vocab_size // 1024))]
    folder.mkdir(parents=True, exist_ok=True)
    if transform != "none":
        from pgolf.data.caseops import TRANSFORM_NAME
        from pgolf.data.prepare import prepare_dataset

        if transform != TRANSFORM_NAME:
            raise UserError(f"data.transform={transform!r}: the probe data can only be made for none or {TRANSFORM_NAME}")
        shout = lambda w, r: w.upper() if r < 0.05 else (w.capitalize() if r < 0.2 else w)  # noqa: E731 - CaseOps operators
        docs = [" ".join(shout(w, rng.random()) for w in d.split()) for d in docs]
        jsonl = folder.parent / f"{folder.name}.docs.jsonl"
        jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        manifest = prepare_dataset(jsonl, folder, train_tokenizer=True, vocab_size=vocab_size, val_docs=max(len(docs) // 10, 8),
                                   progress=False, caseops=True)
        return folder, folder / manifest["tokenizer"]["file"]
    tok = train_tokenizer(docs, folder / "probe_bpe.model", vocab_size)
    gen = np.random.default_rng(0)
    for name, n in (("fineweb_train_000000.bin", 16384), ("fineweb_val_000000.bin", 4096)):
        tokens = gen.integers(2, vocab_size, size=n).astype(np.uint16)
        tokens[::128] = 1  # a BOS every 128 tokens: documents
        write_shard(folder / name, tokens)
    return folder, tok


def clean_env(overrides: dict[str, Any] | None = None, **extra: str) -> dict[str, str]:
    """This process's environment without any setting variable (a SEED in the user's shell must
    not reach a probe), plus ``overrides`` as PGOLF_* variables and ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in CHALLENGE_ENV and k != "RUN_ID" and not (k.startswith(PREFIX) and k not in NON_CONFIG_PGOLF_VARS)}
    for dotted, value in (overrides or {}).items():
        env[env_name(dotted)] = str(value).lower() if isinstance(value, bool) else str(value)
    env.update(extra)
    return env


_PROBE = """import json,sys
from pgolf.submit.entry import main
try:main(json.load(open(sys.argv[1])),sys.argv[1])
finally:json.dump(sorted(sys.modules),open(sys.argv[2],'w'))
"""


def run_subprocess(cmd: list[str], cwd: Path, env: dict[str, str], what: str, timeout: float) -> str:
    """Run ``cmd``; its stdout, or RunError with the tail of its output."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RunError(f"{what} took more than {timeout:.0f} s") from None
    if proc.returncode != 0:
        # Cut long lines: a traceback through the bundle quotes its one-line base85 blob.
        tail = "\n".join(line[:300] for line in (proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RunError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def probe_modules(config: dict[str, Any], overrides: dict[str, Any], data: Path, tokenizer: Path, workdir: Path,
                  timeout: float = 600.0) -> list[str]:
    """Names of every module a shrunk run of ``config`` imports (run through the package)."""
    cfg_path, out_path = workdir / "probe_config.json", workdir / "probe_modules.json"
    cfg_path.write_text(json.dumps(config))
    env = clean_env(overrides, DATA_PATH=str(data), TOKENIZER_PATH=str(tokenizer), RUN_ID="probe")
    run_subprocess([sys.executable, "-c", _PROBE, str(cfg_path), str(out_path)], workdir, env, "the probe run", timeout)
    return json.loads(out_path.read_text())
