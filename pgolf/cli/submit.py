"""Submission commands: ``pgolf bundle``, ``pgolf record``, ``pgolf seeds`` and ``pgolf stats``
(``pgolf audit RECORD_DIR`` is registered by :mod:`pgolf.cli.audit` and runs
:func:`pgolf.submit.audit.main`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pgolf.cli.common import add_config_args, add_tracker_arg, config_from_args, data_overrides, require_tracker_arg
from pgolf.train.codesize import WRAPPERS


def register(sub) -> None:
    p = sub.add_parser("bundle", help="generate the single-file train_gpt.py of a preset and print its bytes",
                       description="Generate one self-contained train_gpt.py holding exactly the pgolf code the configuration "
                       "uses (minified, compressed when that is smaller), the resolved config as defaults and the challenge's "
                       "environment variables as overrides. Runs it once on tiny synthetic data to verify it.")
    add_config_args(p)
    p.add_argument("--out", required=True, help="the file to write, e.g. DIR/train_gpt.py")
    p.add_argument("--wrapper", default="auto", choices=("auto",) + WRAPPERS,
                   help="auto (default): the smallest of plain, lzma/brotli/zstd + base85 (ASCII) and lzma/brotli/zstd + latin-1 literal")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the verification run of the written file")
    p.add_argument("--no-fold", dest="fold", action="store_false",
                   help="keep the code for every setting: do not fold the configuration's fixed values into the code "
                   "(more bytes; the file then takes any PGOLF_* setting from the environment)")
    p.set_defaults(func=run_bundle)

    p = sub.add_parser("record", help="write a record folder from finished seed runs",
                       description="Write records/track_10min_16mb/<date>_<name>/: README.md, submission.json, each seed's "
                       "train log, requirements.txt, the bundled train_gpt.py and loss_curves.png. The runs must share one "
                       "configuration (the seed aside).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, one per seed (log.txt, config.json, ...)")
    p.add_argument("--name", required=True, help="record name (letters, digits, . _ -); the folder is <date>_<name>")
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--blurb", default="", help="one-paragraph description (default: the name)")
    p.add_argument("--date", default=None, help="YYYY-MM-DD (default: today)")
    p.add_argument("--out", default=None, help="record folder (default: records/track_10min_16mb/<date>_<name>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing record folder")
    p.add_argument("--wrapper", default="auto", choices=("auto",) + WRAPPERS)
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the bundle's verification run")
    p.set_defaults(func=run_record)

    p = sub.add_parser("seeds", help="train one configuration once per seed, then print the statistics",
                       description="Full runs, one after another, into OUT/seed_<seed>/; finished seed folders of the same "
                       "configuration are kept. Then prints mean and std (and the Welch test with --against).")
    add_config_args(p)
    p.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 1337,42,2025")
    p.add_argument("--data", default=None, help="data folder (sets data.path)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (sets data.tokenizer)")
    p.add_argument("--out", required=True, help="folder for the seed runs")
    add_tracker_arg(p)
    _add_test_args(p, against_required=False)
    p.set_defaults(func=run_seeds)

    p = sub.add_parser("stats", help="per-seed mean/std and the one-sided Welch test against a reference",
                       description="Mean and std of the runs' scores; with --against, the one-sided Welch t-test of "
                       "mean(reference) - mean(new) > --min-gain-nats (the challenge's rule: 0.005 nats at p < 0.01). "
                       "Exit code 1 if the test fails.")
    p.add_argument("runs", nargs="+", metavar="RUNS", help="run folders, record folders or JSON files of per-seed values")
    _add_test_args(p, against_required=False)
    p.set_defaults(func=run_stats)


def _add_test_args(p: argparse.ArgumentParser, against_required: bool) -> None:
    from pgolf.submit.stats import DEFAULT_ALPHA, DEFAULT_MIN_GAIN_NATS

    p.add_argument("--against", nargs="+", default=None, required=against_required, metavar="RUNS_OR_JSON",
                   help="reference: run/record folders or a JSON file ({\"val_loss\": [...], \"val_bpb\": [...]} or seed_results)")
    p.add_argument("--min-gain-nats", type=float, default=DEFAULT_MIN_GAIN_NATS, help=f"required improvement (default {DEFAULT_MIN_GAIN_NATS})")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help=f"significance level (default {DEFAULT_ALPHA})")


def run_bundle(args: argparse.Namespace) -> int:
    from pgolf.submit.bundle import build_bundle, read_bundle
    from pgolf.submit.record import requirements_for

    keep = any(o.split("=", 1)[0].strip() in ("data.path", "data.tokenizer") for o in args.overrides)
    cfg = config_from_args(args)
    result = build_bundle(cfg, args.out, wrapper=args.wrapper, verify=args.verify, keep_data_paths=keep, fold=args.fold)
    print(result.describe())
    print(f"requirements: {' '.join(requirements_for(read_bundle(result.path)[1], result.wrapper))}")
    print(f"code bytes: {result.bytes}")
    # The bundled script does not repeat the pre-training size prediction: it is given here.
    from pgolf.quant.predict import predict_artifact_bytes

    pred = predict_artifact_bytes(cfg, result.bytes)
    expected = pred["artifact_bytes_calibrated"] or pred["artifact_bytes"]
    print(f"predicted artifact: {expected:,} bytes (upper estimate {pred['artifact_bytes']:,}) of "
          f"{pred['budget_bytes']:,}: {'fits' if pred['fits'] else 'WARNING: over budget'}")
    return 0


def run_record(args: argparse.Namespace) -> int:
    from pgolf.submit.record import write_record

    out = write_record(args.runs, name=args.name, author=args.author, github_id=args.github_id, blurb=args.blurb,
                       out=args.out, date=args.date, overwrite=args.overwrite, wrapper=args.wrapper, verify=args.verify)
    print(f"record folder: {out}")
    for f in sorted(Path(out).iterdir()):
        print(f"  {f.name:<28} {f.stat().st_size:>10,} bytes")
    print(f"check it with: pgolf audit {out}")
    return 0


def run_seeds(args: argparse.Namespace) -> int:
    from pgolf.submit.seeds import parse_seeds, run_seeds as train_seeds

    require_tracker_arg(args)
    cfg = config_from_args(args, data_overrides(args))
    dirs = train_seeds(cfg, parse_seeds(args.seeds), args.out, tracker=args.tracker)
    print()
    return _print_stats([str(d) for d in dirs], args)


def run_stats(args: argparse.Namespace) -> int:
    return _print_stats(args.runs, args)


def _print_stats(runs: list[str], args: argparse.Namespace) -> int:
    from pgolf.submit.stats import compare, format_result, format_sample, load_sample

    new = load_sample(runs, "new")
    print("\n".join(format_sample(new)))
    if not args.against:
        return 0
    ref = load_sample(args.against, "reference")
    print("\n".join(format_sample(ref)))
    result, note = compare(new, ref, args.min_gain_nats, args.alpha)
    print("\n".join(format_result(result, note)))
    return 0 if result.passed else 1
