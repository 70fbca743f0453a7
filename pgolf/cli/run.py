"""``pgolf run``: the whole parameter-golf job on this machine, with no arguments and no network.

Prepares the embedded demo corpus (cached after the first time), trains the default recipe with
the ``cpu`` profile, quantises, compresses and writes the artifact, reloads it from disk into a
fresh model, evaluates it, and prints a short table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pgolf.cli.common import add_config_args, add_tracker_arg, config_from_args, require_tracker_arg
from pgolf.config import load_config, parse_set_args
from pgolf.errors import ConfigError

DEFAULT_RECIPE = "pr401"


def register(sub) -> None:
    p = sub.add_parser("run", help="the whole job on the demo corpus: train a fixed number of steps, export, reload, evaluate (CPU)")
    add_config_args(p, default_preset=DEFAULT_RECIPE)
    p.set_defaults(profile="cpu")
    p.add_argument("--out", default=None, help="run folder (default: runs/run-<date>-<time>)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None,
                        help="train exactly this many steps (default: the profile's train.schedule_steps, 250 at cpu: "
                             "the count its step schedules were scaled for)")
    budget.add_argument("--seconds", type=float, default=None, help="train for a wallclock cap instead of a step count")
    p.add_argument("--data", default=None, help="train on this data folder instead of the demo corpus")
    add_tracker_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pgolf.train.run import run_training

    t0 = time.perf_counter()
    require_tracker_arg(args)
    if args.data:
        data_dir, corpus = Path(args.data), str(args.data)
    else:
        from pgolf.data.demo import demo_for_config

        # The demo variant the recipe needs: its vocabulary, CaseOps for data.transform (R6/R7).
        data_dir, corpus = demo_for_config(config_from_args(args, [])), "demo corpus (State of the Union addresses + Wikipedia lead sections)"
    if args.seconds is not None:
        budget = [("train.max_wallclock_seconds", args.seconds)]
    else:
        steps = args.steps or config_from_args(args, []).train.schedule_steps
        if not steps or steps < 1:
            raise ConfigError(f"profile {args.profile} states no train.schedule_steps: pass --steps N or --seconds S")
        # A fixed step count: what the cpu schedules were scaled for, the same work on any machine.
        budget = [("train.iterations", steps), ("train.max_wallclock_seconds", 0.0)]
    # --steps / --seconds win over the same keys given with --set (as in pgolf ablate)
    cfg = load_config(args.preset, args.profile, [("data.path", str(data_dir))] + parse_set_args(args.overrides) + budget)
    out = Path(args.out or f"runs/run-{time.strftime('%Y%m%d-%H%M%S')}")
    summary = run_training(cfg, out, tracker=args.tracker)
    wall = time.perf_counter() - t0
    print()
    print(format_summary_table(summary, cfg.preset, cfg.profile, corpus, out, wall))
    return 0


def format_summary_table(s: dict, preset: str, profile: str, corpus: str, out: Path, wall: float) -> str:
    prefix = s.get("val_prefix")
    scope = f" [prefix: {prefix['targets']:,} of {prefix['of']:,} targets, not a score]" if prefix else ""
    rows = [("recipe", f"{preset} @ profile {profile}"), ("data", corpus)]
    if s.get("val_bpb_prequant") is not None:
        gap = s["val_bpb_roundtrip"] - s["val_bpb_prequant"]
        rows += [("val_bpb before quantisation", f"{s['val_bpb_prequant']:.4f}{scope}"),
                 ("val_bpb after round trip", f"{s['val_bpb_roundtrip']:.4f}  ({gap:+.4f}, {s.get('quant_label', '')}){scope}")]
    else:
        rows.append(("val_bpb after round trip", f"{s['val_bpb_roundtrip']:.4f}  ({s.get('quant_label', '')}){scope}"))
    if "val_bpb_sliding" in s:
        rows.append(("val_bpb sliding window", f"{s['val_bpb_sliding']:.4f}  (stride {s.get('sliding_stride', '')}){scope}"))
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
