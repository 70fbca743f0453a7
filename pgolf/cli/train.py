"""``pgolf train``: one training run into a run folder (works under torchrun too)."""

from __future__ import annotations

import argparse
import os

from pgolf.cli.common import add_config_args, config_from_args, data_overrides


def register(sub) -> None:
    p = sub.add_parser("train", help="train, export and evaluate one run", description="Train a preset (recipe) on a data folder; "
                       "writes log.txt, metrics.jsonl, config.json, the artifact and summary.json into --out.")
    add_config_args(p)
    p.add_argument("--data", default=None, help="folder with fineweb_train_*.bin / fineweb_val_*.bin (sets data.path)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the one in the data folder's manifest)")
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--seed", type=int, default=None, help="sets train.seed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pgolf.train.loop import run_training

    cfg = config_from_args(args, data_overrides(args))
    summary = run_training(cfg, args.out)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the summary; one line is enough
        print(f"run folder: {args.out}  val_bpb(roundtrip): {summary['val_bpb_roundtrip']:.4f}")
    return 0
