"""``pgolf run``: the whole parameter-golf job on this machine, with no arguments and no network.

Prepares the embedded demo corpus (cached after the first time), trains the default recipe with
the ``cpu`` profile, quantises, compresses and writes the artifact, reloads it from disk into a
fresh model, evaluates it, and prints a short table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pgolf.cli.common import add_config_args, config_from_args

DEFAULT_RECIPE = "pr401"
DEFAULT_SECONDS = 120.0


def register(sub) -> None:
    p = sub.add_parser("run", help="the whole job on the demo corpus: train, export, reload, evaluate (CPU, ~3 min)")
    add_config_args(p, default_preset=DEFAULT_RECIPE)
    p.set_defaults(profile="cpu")
    p.add_argument("--out", default=None, help="run folder (default: runs/run-<date>-<time>)")
    p.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help=f"training wallclock cap (default {DEFAULT_SECONDS:.0f})")
    p.add_argument("--data", default=None, help="train on this data folder instead of the demo corpus")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pgolf.train.loop import run_training

    t0 = time.perf_counter()
    if args.data:
        data_dir, corpus = Path(args.data), str(args.data)
    else:
        from pgolf.data.demo import demo_for_config

        # The demo variant the recipe needs: its vocabulary, CaseOps for data.transform (R6/R7).
        data_dir, corpus = demo_for_config(config_from_args(args, [])), "demo corpus (State of the Union addresses + Wikipedia lead sections)"
    cfg = config_from_args(
        args,
        [
            ("data.path", str(data_dir)),
            ("train.max_wallclock_seconds", args.seconds),
        ],
    )
    out = Path(args.out or f"runs/run-{time.strftime('%Y%m%d-%H%M%S')}")
    summary = run_training(cfg, out)
    wall = time.perf_counter() - t0
    print()
    print(format_summary_table(summary, cfg.preset, cfg.profile, corpus, out, wall))
    return 0


def format_summary_table(s: dict, preset: str, profile: str, corpus: str, out: Path, wall: float) -> str:
    gap = s["val_bpb_roundtrip"] - s["val_bpb_prequant"]
    rows = [
        ("recipe", f"{preset} @ profile {profile}"),
        ("data", corpus),
        ("val_bpb before quantisation", f"{s['val_bpb_prequant']:.4f}"),
        ("val_bpb after round trip", f"{s['val_bpb_roundtrip']:.4f}  ({gap:+.4f}, {s.get('quant_label', '')})"),
    ]
    if "val_bpb_sliding" in s:
        rows.append(("val_bpb sliding window", f"{s['val_bpb_sliding']:.4f}  (stride {s.get('sliding_stride', '')})"))
    budget = s["budget_bytes"]
    rows += [
        ("artifact bytes", f"{s['artifact_bytes']:,} = code {s['code_bytes']:,} + model {s['model_bytes']:,}"),
        ("budget", f"{budget:,} ({100 * s['artifact_bytes'] / budget:.1f}% used, {'fits' if s['fits_budget'] else 'OVER'})"),
        ("params", f"{s['params']:,}"),
        ("steps", f"{s['steps']:,}"),
        ("tokens seen", f"{s['tokens_seen']:,}"),
        ("tokens/s", f"{s['tokens_per_second']:,.0f}"),
        ("train time", f"{s['train_seconds']:.1f} s"),
        ("wall time", f"{wall:.1f} s"),
        ("run folder", str(out)),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])
