"""Research commands: ``pgolf ablate`` (settings against a recipe, with seeds and statistics),
``pgolf compare`` (runs side by side), ``pgolf runs`` (the runs under a folder and their status) and
``pgolf track`` (a run's metrics.jsonl replayed into TensorBoard or W&B).
The logic lives in :mod:`pgolf.submit.ablate` and :mod:`pgolf.submit.compare`."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from pgolf.cli.common import add_config_args, add_tracker_arg, data_overrides, print_json


def register(sub) -> None:
    p = sub.add_parser("ablate", help="train a grid of settings x seeds and test each cell against the first",
                       description="Each --vary KEY=V1,V2,... is an option whose first value is the baseline. Every cell "
                       "(one value per option; with --greedy, forward selection) is trained once per seed into "
                       "OUT/cells/<cell>/seed_<seed>/; rerunning the same command keeps finished runs and resumes "
                       "interrupted ones. Prints n, mean ± std, Δ and the one-sided Welch p-value against the first "
                       "cell; writes OUT/ablation.json, ablation.md and ablation.png.")
    add_config_args(p)
    p.add_argument("--vary", action="append", default=[], required=True, metavar="KEY=V1,V2[,...]",
                   help="a setting and its values, the first the baseline (repeatable: the grid is their product); "
                        "';' separates values that contain commas; KEY1+KEY2=A1+A2,B1+B2 ties settings that change together")
    p.add_argument("--seeds", required=True, help="a count (3 = 1337,42,2025) or a comma-separated list of seeds")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="train every run for N steps (no wallclock cap)")
    budget.add_argument("--seconds", type=float, default=None, help="train every run for S seconds of training time")
    p.add_argument("--data", default=None, help="data folder (sets data.path)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (sets data.tokenizer)")
    p.add_argument("--out", required=True, help="folder for the cells' runs and the reports")
    p.add_argument("--greedy", action="store_true", help="forward selection over the --vary options instead of the full grid")
    p.add_argument("--margin", type=float, default=0.0, help="--greedy keeps a change when it lowers the mean val_bpb by more than this (default 0)")
    p.add_argument("--min-gain-nats", type=float, default=0.0, help="the Welch test's H1: the cell beats the first cell by more than this (default 0)")
    p.add_argument("--devices", default="auto", metavar="auto|inprocess|DEV,DEV,...",
                   help="where cells train: auto (default) = concurrently, one child process per visible CUDA device, when "
                        "there are more than one, else one after another in this process; inprocess = always here; or a "
                        "list such as cuda:0,cuda:1 (cpu,cpu: CPU children, for tests or multi-socket machines). "
                        "Each child's output: OUT/cells/<cell>/ablate-child.log")
    add_tracker_arg(p)
    p.set_defaults(func=run_ablate)

    p = sub.add_parser("compare", help="one table (settings that differ, steps, tok/s, val_bpb, bytes) for several runs",
                       description="Run folders, globs or folders of run folders. Prints the preset, every setting that "
                       "differs between the runs, steps, tokens/s, pre-quant / round-trip / sliding / TTT val_bpb and "
                       "artifact bytes; --plot overlays their loss curves.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders, globs (quoted) or folders holding run folders")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="write the runs' training/validation loss curves to this PNG")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=run_compare)

    p = sub.add_parser("runs", help="list the run folders under a folder with their status (finished, interrupted, resumable, ...)",
                       description="Every run folder under DIR: status (finished, interrupted, diverged, failed, running, "
                       "unknown), the newest complete checkpoint a resume continues from, preset, steps and round-trip val_bpb.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=run_runs)

    p = sub.add_parser("track", help="replay finished (or partial) runs' metrics.jsonl into TensorBoard or an offline W&B run",
                       description="For each run folder (folders, quoted globs or folders of run folders): feed its "
                       "metrics.jsonl through the same adapter --tracker uses during training, into RUN/tensorboard/ or "
                       "RUN/wandb/. A run that already has that folder is refused unless --overwrite.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders, globs (quoted) or folders holding run folders")
    p.add_argument("--tracker", required=True, choices=("tensorboard", "wandb"))
    p.add_argument("--overwrite", action="store_true", help="replace a tracker folder the run already has")
    p.set_defaults(func=run_track)


def _budget_overrides(args: argparse.Namespace) -> tuple[list[tuple[str, object]], str]:
    from pgolf.submit.ablate import AblateError

    if args.steps is not None:
        if args.steps < 1:
            raise AblateError(f"--steps {args.steps}: give a positive number of steps")
        return [("train.iterations", args.steps), ("train.max_wallclock_seconds", 0.0)], f"{args.steps} steps per run"
    if args.seconds is not None:
        if args.seconds <= 0:
            raise AblateError(f"--seconds {args.seconds}: give a positive training time")
        return [("train.max_wallclock_seconds", args.seconds)], f"{args.seconds:g} s of training per run"
    return [], "the configuration's own steps and wallclock cap"


def run_ablate(args: argparse.Namespace) -> int:
    from pgolf.config import parse_set_args
    from pgolf.submit.ablate import Ablation, parse_seed_count, parse_vary, run_ablation
    from pgolf.train.loop import RunInterrupted

    options = parse_vary(args.vary)
    seeds = parse_seed_count(args.seeds)
    budget_overrides, budget = _budget_overrides(args)
    # --steps / --seconds come last: they win over the same keys given with --set
    ablation = Ablation(args.preset, args.profile, data_overrides(args) + parse_set_args(args.overrides) + budget_overrides,
                        seeds, Path(args.out), options, min_gain_nats=args.min_gain_nats, tracker=args.tracker,
                        devices=args.devices)
    command = ablate_command(args)
    try:
        report = run_ablation(ablation, greedy=args.greedy, margin=args.margin, command=command, budget=budget)
    except RunInterrupted as exc:
        where = "interrupted" if exc.step is None else f"interrupted at step {exc.step}"  # None: cells in child processes
        print(f"{where}; checkpoint saved; rerun the same command to resume (finished cells are kept)", file=sys.stderr)
        return 128 + (exc.signum or signal.SIGINT)
    return 1 if any(c.get("failed") for c in report["cells"]) else 0  # a child process failed (reported above)


def ablate_command(args: argparse.Namespace) -> str:
    """The command line that reruns (and so resumes) this ablation, rebuilt from the parsed
    options so that it is the same however pgolf was called (console script, -m, a test)."""
    parts = ["pgolf", "ablate", "--preset", args.preset] + (["--profile", args.profile] if args.profile else [])
    for item in args.overrides:
        parts += ["--set", item]
    for item in args.vary:
        parts += ["--vary", item]
    parts += ["--seeds", args.seeds]
    for flag in ("steps", "seconds", "data", "tokenizer"):
        if getattr(args, flag) is not None:
            parts += [f"--{flag}", str(getattr(args, flag))]
    parts += ["--out", args.out]
    if args.greedy:
        parts += ["--greedy", "--margin", f"{args.margin:g}"]
    if args.min_gain_nats:
        parts += ["--min-gain-nats", f"{args.min_gain_nats:g}"]
    if args.devices != "auto":
        parts += ["--devices", args.devices]
    if args.tracker:
        parts += ["--tracker", args.tracker]
    return " ".join(shlex.quote(p) for p in parts)


def run_compare(args: argparse.Namespace) -> int:
    from pgolf.submit.compare import compare_runs, compare_table, expand_run_args, infos_json, plot_compare

    infos, keys = compare_runs(expand_run_args(args.runs))
    if args.json:
        print_json({"differing_settings": keys, "runs": infos_json(infos)})
    else:
        print(compare_table(infos, keys))
    if args.plot:
        plot_compare(infos, Path(args.plot), f"{len(infos)} runs")
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


def run_runs(args: argparse.Namespace) -> int:
    from pgolf.submit.compare import find_runs, infos_json, read_run, runs_table

    root = Path(args.dir)
    infos = [read_run(d) for d in find_runs(root)]
    if args.json:
        print_json(infos_json(infos))
    elif not infos:
        print(f"no run folders under {root}")
    else:
        print(runs_table(infos, root))
    return 0


def run_track(args: argparse.Namespace) -> int:
    from pgolf.submit.compare import expand_run_args
    from pgolf.train.tracker import replay, require_tracker

    require_tracker(args.tracker)
    runs = expand_run_args(args.runs)
    for run in runs:
        count, folder = replay(run, args.tracker, overwrite=args.overwrite)
        print(f"{run}: {count} events -> {folder}")
    if args.tracker == "tensorboard":
        print(f"view with: tensorboard --logdir {args.runs[0] if len(args.runs) == 1 else '<a folder holding the runs>'}")
    else:
        print("upload with: wandb sync RUN/wandb/offline-run-*")
    return 0
