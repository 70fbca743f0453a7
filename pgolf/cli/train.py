"""``pgolf train``: one training run into a run folder (works under torchrun too)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from pgolf.cli.common import add_config_args, add_tracker_arg, config_from_args, data_overrides, require_tracker_arg


def register(sub) -> None:
    p = sub.add_parser("train", help="train, export and evaluate one run", description="Train a preset (recipe) on a data folder; "
                       "writes log.txt, metrics.jsonl, config.json, checkpoints, the artifact and summary.json (last) into --out.")
    add_config_args(p)
    p.add_argument("--data", default=None, help="folder with fineweb_train_*.bin / fineweb_val_*.bin (sets data.path)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the one in the data folder's manifest)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="run folder to create (an existing one is refused unless --overwrite)")
    where.add_argument("--resume", metavar="RUN_DIR", help="continue this run folder from its newest complete checkpoint "
                       "(its config.json is the configuration; --set may only repeat it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder as a whole")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N", help="checkpoint every N steps (sets train.checkpoint_every)")
    p.add_argument("--seed", type=int, default=None, help="sets train.seed")
    add_tracker_arg(p)
    p.set_defaults(func=run)


def resume_config(args: argparse.Namespace):
    """The run folder's own configuration, with any --set applied on top (a change that alters the
    computation is then refused by the checkpoint's config hash)."""
    from pgolf.config import from_dict, parse_set_args, set_value
    from pgolf.errors import ConfigError

    path = Path(args.resume) / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{args.resume} is not a pgolf run folder (no config.json); nothing to resume") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the run's configuration ({exc})") from None
    cfg = from_dict(saved)
    for key, value in data_overrides(args) + parse_set_args(args.overrides):
        set_value(cfg, key, value)
    return cfg.validate()


def run(args: argparse.Namespace) -> int:
    from pgolf.train.loop import RunInterrupted
    from pgolf.train.run import run_training

    require_tracker_arg(args)
    extra = data_overrides(args)
    if args.checkpoint_every is not None:
        extra.append(("train.checkpoint_every", args.checkpoint_every))
    if args.resume:
        cfg = resume_config(args)
        if args.checkpoint_every is not None:
            cfg.train.checkpoint_every = args.checkpoint_every
        out, mode = args.resume, "resume"
    else:
        cfg = config_from_args(args, extra)
        out, mode = args.out, "overwrite" if args.overwrite else "new"
    try:
        summary = run_training(cfg, out, mode=mode, tracker=args.tracker)
    except RunInterrupted as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"interrupted at step {exc.step}; checkpoint saved; continue with: pgolf train --resume {out}", file=sys.stderr)
        return 128 + (exc.signum or signal.SIGINT)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the summary; one line is enough
        print(f"run folder: {out}  val_bpb(roundtrip): {summary['val_bpb_roundtrip']:.4f}")
    return 0
