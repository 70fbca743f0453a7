"""Argument helpers shared by the sub-commands that build a run configuration."""

from __future__ import annotations

import argparse
import json
import sys

from pgolf.config import RunConfig, load_config, parse_set_args


def add_config_args(p: argparse.ArgumentParser, default_preset: str = "baseline") -> None:
    p.add_argument("--preset", default=default_preset, help=f"recipe name (default: {default_preset}); see `pgolf inspect --list`")
    p.add_argument("--profile", default=None, help="hardware budget: 8xh100, 1xh100 or cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")


def add_tracker_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracker", choices=("tensorboard", "wandb"), default=None,
                   help="also send every metrics.jsonl event to TensorBoard (RUN/tensorboard/) or an offline W&B run "
                        "(RUN/wandb/); needs the extra: pip install -e \".[tensorboard]\" or \".[wandb]\"")


def require_tracker_arg(args: argparse.Namespace) -> None:
    """A missing tracker package is one error line before anything is prepared or trained."""
    if getattr(args, "tracker", None):
        from pgolf.train.tracker import require_tracker

        require_tracker(args.tracker)


def config_from_args(args: argparse.Namespace, extra: list[tuple[str, object]] | None = None) -> RunConfig:
    overrides = list(extra or []) + parse_set_args(args.overrides)
    return load_config(args.preset, args.profile, overrides)


def data_overrides(args: argparse.Namespace) -> list[tuple[str, object]]:
    """``--data`` / ``--tokenizer`` / ``--seed`` (where a command has them) as config overrides."""
    out: list[tuple[str, object]] = []
    for flag, key in (("data", "data.path"), ("tokenizer", "data.tokenizer"), ("seed", "train.seed")):
        value = getattr(args, flag, None)
        if value is not None and value != "":
            out.append((key, value))
    return out


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=float)
    sys.stdout.write("\n")
