"""``pgolf record``: turn finished seed runs into the challenge's record folder.

``records/track_10min_16mb/<date>_<name>/`` holds:

* ``train_gpt.py``: the bundled script of the runs' configuration (``pgolf bundle``), its default
  seed the first run's, its data paths the challenge's defaults;
* ``train_seed<seed>.log``: each run's ``log.txt``;
* ``submission.json``: the challenge's fields (author, github_id, name, blurb, date, val_loss,
  val_bpb, bytes_total, bytes_code) plus per-seed results. ``val_loss`` / ``val_bpb`` are the means
  over seeds of each log's score line (:mod:`pgolf.submit.stats`: sliding window when the run has
  one, else the round trip). ``bytes_code`` is the size of ``train_gpt.py``; ``bytes_total`` is
  ``bytes_code`` + the largest model (artifact) of the seeds, so every seed fits;
* ``README.md`` (recipe, per-seed table, mean and std, bytes, the command to reproduce),
  ``requirements.txt`` (pinned libraries the script imports) and ``loss_curves.png``.

The folder is built in a temporary sibling and renamed into place, so it is never half-written.
"""

from __future__ import annotations

import ast
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgolf.config import SECTIONS, diff_from_defaults, from_dict
from pgolf.errors import UserError
from pgolf.submit.stats import LogFacts, mean_std, parse_log

TRACK_DIR = Path("records") / "track_10min_16mb"
CAP_BYTES = 16_000_000
LOG_NAME = "train_seed{seed}.log"
PLOT_NAME = "loss_curves.png"
REQUIRED_FILES = ("README.md", "submission.json", "train_gpt.py", "requirements.txt")
SUBMISSION_FIELDS = {  # the challenge's submission.json fields and their JSON types
    "author": str, "github_id": str, "name": str, "blurb": str, "date": str,
    "val_loss": float, "val_bpb": float, "bytes_total": int, "bytes_code": int,
}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


class RecordError(UserError):
    """Runs that cannot make a record folder."""


@dataclass
class SeedRun:
    run_dir: Path
    facts: LogFacts
    metrics: Path | None  # metrics.jsonl, when present

    @property
    def seed(self) -> int:
        assert self.facts.seed is not None
        return self.facts.seed


def config_without_seed(config: dict[str, Any]) -> dict[str, Any]:
    """The config with ``train.seed`` removed: what every seed of a record must share."""
    out = json.loads(json.dumps(config))
    out.get("train", {}).pop("seed", None)
    return out


def config_hash(config: dict[str, Any]) -> str:
    """sha256 (first 16 hex) of the config without the seed, keys sorted."""
    return hashlib.sha256(json.dumps(config_without_seed(config), sort_keys=True).encode()).hexdigest()[:16]


def _same_meaning(config: dict[str, Any]) -> dict[str, Any]:
    """The config with its data paths in one form, so that configurations that mean the same
    compare equal: ``data.path`` resolved; ``data.tokenizer`` empty (the manifest's tokenizer)
    replaced by the manifest's file, and any tokenizer file that exists by its sha256."""
    data = config.get("data")
    if not isinstance(data, dict) or "path" not in data:
        return config
    folder = Path(str(data["path"])).expanduser()
    tok = str(data.get("tokenizer") or "")
    if not tok and (folder / "manifest.json").is_file():
        try:
            tok = str(folder / json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["tokenizer"]["file"])
        except (OSError, ValueError, KeyError, TypeError):
            tok = ""
    if tok and Path(tok).expanduser().is_file():
        tok = "sha256:" + hashlib.sha256(Path(tok).expanduser().read_bytes()).hexdigest()
    elif tok:
        tok = str(Path(tok).expanduser().resolve())
    data["path"], data["tokenizer"] = str(folder.resolve()), tok
    return config


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``section.key`` names whose values differ between two configs (seed excluded). Data paths
    are compared by what they name (see :func:`_same_meaning`)."""
    a, b = _same_meaning(config_without_seed(a)), _same_meaning(config_without_seed(b))
    out = []
    for section in sorted(set(a) | set(b)):
        va, vb = a.get(section), b.get(section)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += [f"{section}.{k}" for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)]
        elif va != vb:
            out.append(section)
    return out


def load_run(run_dir: str | Path) -> SeedRun:
    """A finished run folder (log.txt with its config, model bytes and score lines)."""
    run_dir = Path(run_dir)
    log = run_dir / "log.txt"
    if not log.is_file():
        raise RecordError(f"{run_dir}: no log.txt; pass run folders made by pgolf train / pgolf seeds / a bundled train_gpt.py")
    facts = parse_log(log)
    missing = [what for what, ok in (("the config line", facts.config is not None), ("a seed", facts.seed is not None),
                                     ("a 'Serialized model' line", facts.model_bytes is not None),
                                     ("a final_*_exact score line", facts.score is not None)) if not ok]
    if missing:
        raise RecordError(f"{log}: has no {', no '.join(missing)}; the run did not finish")
    metrics = run_dir / "metrics.jsonl"
    return SeedRun(run_dir, facts, metrics if metrics.is_file() else None)


def check_same_config(runs: list[SeedRun]) -> None:
    first = runs[0]
    for r in runs[1:]:
        diff = config_differences(first.facts.config, r.facts.config)
        if diff:
            raise RecordError(
                f"{r.run_dir} and {first.run_dir} ran different configurations ({', '.join(diff[:6])}); "
                "a record's seeds must differ only in train.seed"
            )
    seeds = [r.seed for r in runs]
    if len(set(seeds)) != len(seeds):
        raise RecordError(f"seeds repeat ({', '.join(map(str, seeds))}); each run of a record needs its own seed")


# ------------------------------------------------------------------------------------------------
# contents


def seed_results(runs: list[SeedRun], code_bytes: int) -> list[dict[str, Any]]:
    out = []
    for r in runs:
        loss, bpb = r.facts.score
        out.append({
            "seed": r.seed, "val_loss": loss, "val_bpb": bpb, "score_line": r.facts.score_line,
            "model_bytes": r.facts.model_bytes, "bytes_total": code_bytes + r.facts.model_bytes,
            "steps": r.facts.steps, "train_seconds": r.facts.train_seconds, "eval_seconds": r.facts.eval_seconds,
            "log": LOG_NAME.format(seed=r.seed),
        })
    return out


def submission(runs: list[SeedRun], code_bytes: int, *, name: str, author: str, github_id: str, blurb: str,
               date: str) -> dict[str, Any]:
    import pgolf

    per_seed = seed_results(runs, code_bytes)
    loss_mean, loss_std = mean_std([s["val_loss"] for s in per_seed])
    bpb_mean, bpb_std = mean_std([s["val_bpb"] for s in per_seed])
    cfg = runs[0].facts.config
    return {
        "author": author, "github_id": github_id, "name": name, "blurb": blurb, "date": date,
        "val_loss": loss_mean, "val_bpb": bpb_mean,
        "bytes_total": code_bytes + max(r.facts.model_bytes for r in runs), "bytes_code": code_bytes,
        "val_loss_std": loss_std, "val_bpb_std": bpb_std, "num_seeds": len(runs),
        "score": "mean over seeds of each log's score line (legal TTT if run, else sliding window if run, else round trip)",
        "bytes_total_rule": "bytes_code (train_gpt.py) + the largest model_bytes over the seeds",
        "seed_results": per_seed,
        "preset": cfg.get("preset"), "profile": cfg.get("profile"), "config_sha256_16": config_hash(cfg),
        "hardware": hardware(runs[0].facts), "pgolf_version": pgolf.__version__,
    }


def requirements_for(modules: dict[str, str], wrapper: str) -> list[str]:
    """requirements.txt lines: pinned distributions of the third-party modules the bundled code
    (``read_bundle``'s modules) imports, and the wrapper's decompressor. Local version labels
    (``+cpu``) are dropped: the same release serves every accelerator."""
    tops: set[str] = set()
    for name, src in modules.items():
        if "/" in name:
            continue  # a data file
        for n in ast.walk(ast.parse(src)):
            if isinstance(n, ast.Import):
                tops.update(a.name.split(".")[0] for a in n.names)
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                tops.add(n.module.split(".")[0])
    from pgolf.train.codesize import CODEC_MODULE, codec_of

    if codec_of(wrapper):
        tops.add(CODEC_MODULE[codec_of(wrapper)])
    tops -= set(sys.stdlib_module_names) | {"pgolf", "__future__"}
    dists = importlib.metadata.packages_distributions()
    pins = set()
    for top in tops:
        for dist in dists.get(top, []):
            pins.add(f"{dist}=={importlib.metadata.version(dist).split('+')[0]}")
    return sorted(pins, key=str.lower)


def hardware(facts: LogFacts) -> str:
    env = facts.env
    if env.get("gpu"):
        return f"{env.get('gpu_count', '?')} x {env['gpu']} (CUDA {env.get('cuda', '?')}), torch {env.get('torch', '?')}"
    return f"{env.get('device', 'cpu')} ({env.get('cpu_count', '?')} CPUs), torch {env.get('torch', '?')}"


def reproduce_command(cfg_dict: dict[str, Any], seed: int) -> str:
    on_cpu = cfg_dict.get("train", {}).get("device") == "cpu"
    launcher = "python train_gpt.py" if on_cpu else "torchrun --standalone --nproc_per_node=8 train_gpt.py"
    return f"SEED={seed} {launcher}"


def readme(sub: dict[str, Any], cfg_dict: dict[str, Any], bundle_wrapper: str) -> str:
    from pgolf.config import preset_meta

    cfg = from_dict(cfg_dict)
    try:
        description = preset_meta(cfg.preset).get("description", "")
    except UserError:
        description = ""
    diff = diff_from_defaults(cfg)
    diff.pop("data", None)
    rows = "\n".join(f"| `{s}.{k}` | `{json.dumps(v)}` |" for s in SECTIONS for k, v in diff.get(s, {}).items())
    seeds = sub["seed_results"]

    def f8(x: float | None) -> str:
        return "" if x is None else f"{x:.8f}"

    def f1(x: float | None) -> str:
        return "" if x is None else f"{x:.1f}"

    table = "\n".join(
        f"| {s['seed']} | {s['steps']} | {f1(s['train_seconds'])} | {f1(s['eval_seconds'])} | {f8(s['val_loss'])} | "
        f"{f8(s['val_bpb'])} | {s['model_bytes']:,} | {s['bytes_total']:,} |" for s in seeds
    )
    cmds = "\n".join(reproduce_command(cfg_dict, s["seed"]) for s in seeds)
    return f"""# {sub['name']}

{sub['blurb']}

**val_bpb {sub['val_bpb']:.8f}** (val_loss {sub['val_loss']:.8f} nats): mean over {sub['num_seeds']} seeds, sample std
{sub['val_bpb_std']:.8f} bpb / {sub['val_loss_std']:.8f} nats. Each seed's score is its log's
`{seeds[0]['score_line']}` line. Artifact: **{sub['bytes_total']:,} bytes** = code {sub['bytes_code']:,}
(`train_gpt.py`) + the largest model of the seeds, {sub['bytes_total'] - sub['bytes_code']:,} (cap {CAP_BYTES:,}).

Author: {sub['author']} (@{sub['github_id']}), {sub['date']}. Hardware of these runs: {sub['hardware']}.

## Recipe

pgolf preset `{cfg.preset}` with profile `{cfg.profile}`. {description}

Settings that differ from pgolf's defaults (the challenge baseline):

| setting | value |
|---|---|
{rows}

## Results

| seed | steps | train s | eval s | val_loss | val_bpb | model bytes | total bytes |
|---|---|---|---|---|---|---|---|
{table}
| **mean** | | | | **{sub['val_loss']:.8f}** | **{sub['val_bpb']:.8f}** | | |
| std | | | | {sub['val_loss_std']:.8f} | {sub['val_bpb_std']:.8f} | | |

![training loss of every seed]({PLOT_NAME})

## Reproduce

`train_gpt.py` is generated by `pgolf bundle` from pgolf {sub['pgolf_version']} (wrapper: {bundle_wrapper}). It
runs only the pgolf sources embedded in it, never an installed pgolf, and embeds this configuration; the challenge's environment variables override it (`SEED`, `MAX_WALLCLOCK_SECONDS`,
`DATA_PATH`, `TOKENIZER_PATH`, ...). Data defaults: `{cfg_dict['data']['path']}`, tokenizer
`{cfg_dict['data']['tokenizer']}`. Each run writes `logs/<preset>_seed<SEED>/` (log, metrics, summary, artifact).

```bash
pip install -r requirements.txt
{cmds}
```

Check the folder with `pgolf audit <this folder>` (sizes, time limits, one configuration, the score,
train/validation disjointness).
"""


def plot_curves(runs: list[SeedRun], path: Path, title: str) -> None:
    """Training loss (and validation points) of every seed against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for r in runs:
        train, val = _curves(r)
        line = ax.plot([s for s, _ in train], [v for _, v in train], lw=1.2, label=f"seed {r.seed} train")[0]
        if val:
            ax.plot([s for s, _ in val], [v for _, v in val], "o", color=line.get_color(), ms=5, label=f"seed {r.seed} val")
        loss, bpb = r.facts.score
        ax.axhline(loss, color=line.get_color(), ls=":", lw=1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.99, 0.01, "dotted: final score (val_loss) of each seed", ha="right", fontsize=7, color="gray")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _curves(r: SeedRun) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train_loss) and (step, val_loss) from metrics.jsonl, else from the log lines."""
    if r.metrics is not None:
        train, val = [], []
        for line in r.metrics.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("event") == "train" and "train_loss" in rec:
                train.append((int(rec["step"]), float(rec["train_loss"])))
            elif rec.get("event") == "val" and "val_loss" in rec:
                val.append((int(rec["step"]), float(rec["val_loss"])))
        if train:
            return train, val
    return list(r.facts.train_curve), [(s, l) for s, l, _ in r.facts.val_curve]


# ------------------------------------------------------------------------------------------------


def write_record(run_dirs: list[str | Path], *, name: str, author: str, github_id: str, blurb: str = "",
                 out: str | Path | None = None, date: str | None = None, overwrite: bool = False,
                 wrapper: str = "auto", verify: bool = True) -> Path:
    """Write the record folder of ``run_dirs`` (one per seed); returns its path."""
    from pgolf.submit.bundle import build_bundle, read_bundle

    if not _NAME_RE.match(name):
        raise RecordError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (it names the folder)")
    if not run_dirs:
        raise RecordError("give at least one run folder")
    date = date or _dt.date.today().isoformat()
    out = Path(out) if out else TRACK_DIR / f"{date}_{name}"
    if out.exists() and not overwrite:
        raise RecordError(f"{out} already exists; pass --overwrite to replace it or choose another --name/--out")
    runs = [load_run(d) for d in run_dirs]
    check_same_config(runs)
    cfg = from_dict(runs[0].facts.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        result = build_bundle(cfg, tmp / "train_gpt.py", wrapper=wrapper, verify=verify)
        sub = submission(runs, result.bytes, name=name, author=author, github_id=github_id, blurb=blurb or name, date=date)
        if sub["bytes_total"] > CAP_BYTES:
            raise RecordError(f"bytes_total {sub['bytes_total']:,} is over the {CAP_BYTES:,}-byte cap; "
                              "this is not a valid submission (shrink the model or its format)")
        (tmp / "submission.json").write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(readme(sub, result.config, result.wrapper), encoding="utf-8")
        _, modules = read_bundle(tmp / "train_gpt.py")
        (tmp / "requirements.txt").write_text("\n".join(requirements_for(modules, result.wrapper)) + "\n", encoding="utf-8")
        for r in runs:
            shutil.copyfile(r.run_dir / "log.txt", tmp / LOG_NAME.format(seed=r.seed))
        plot_curves(runs, tmp / PLOT_NAME, f"{name}: {cfg.preset}/{cfg.profile}, {len(runs)} seeds")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
