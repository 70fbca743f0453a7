"""``pgolf audit``: checks that a submission is legal.

* ``pgolf audit causality --artifact PATH --val GLOB --tokenizer MODEL [...]``: the dynamic
  token-flip test (``pgolf.eval.causality``) for the plain, sliding and TTT evaluations of an
  artifact (``--ttt phased``: R6/R7's phased TTT, checked in its scoring order). Exit code 0 if every mode passes, 1 otherwise.
* ``pgolf audit RECORD_DIR [...]`` (any other first argument): the record audit of
  ``pgolf.submit.audit.main(argv)``, to which the whole argument list is handed.
"""

from __future__ import annotations

import argparse
import sys

from pgolf.cli.common import print_json
from pgolf.errors import ConfigError, MissingDependencyError


def register(sub) -> None:
    p = sub.add_parser(
        "audit",
        help="audit a record folder, or run the causality check on an artifact (pgolf audit causality ...)",
        description="`pgolf audit causality --artifact PATH --val GLOB --tokenizer MODEL` runs the token-flip causality "
        "check; `pgolf audit RECORD_DIR ...` audits a record folder (see `pgolf audit RECORD_DIR --help`).",
    )
    p.add_argument("target", metavar="causality|RECORD_DIR", help="'causality' or a record folder")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of that audit")
    p.set_defaults(func=run)


def causality_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgolf audit causality",
        description="Flip one token at random stream positions and verify that no earlier target's NLL changes, "
        "for the standard eval, the sliding-window eval and score-first TTT. Runs on a prefix of the stream.",
    )
    p.add_argument("--artifact", required=True, help="a .pgolf artifact file")
    p.add_argument("--val", required=True, help="glob of validation shards")
    p.add_argument("--tokenizer", required=True, help="SentencePiece model the shards were made with")
    p.add_argument("--mode", choices=("plain", "sliding", "ttt", "all"), default="all", help="which evaluation to check (default all)")
    p.add_argument("--seq-len", type=int, default=0, help="window length (default: the artifact's eval seq len)")
    p.add_argument("--stride", type=int, default=64, help="sliding stride (default 64)")
    p.add_argument("--positions", type=int, default=16, help="random positions to flip per mode (default 16)")
    p.add_argument("--max-tokens", type=int, default=0, help="prefix of the stream to audit (default: 4 windows of seq-len)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atol", type=float, default=1e-6, help="NLL tolerance before the flip (default 1e-6 nats)")
    p.add_argument("--ttt", choices=("sgd", "lora", "phased"), default="sgd",
                   help="TTT variant checked by --mode ttt/all (phased: R6/R7's per-document LoRA + global SGD, checked in scoring order)")
    p.add_argument("--ttt-preset", default=None,
                   help="take the [ttt] values of a preset (e.g. pr1855: its LoRA rank, learning rates, betas); the sizes "
                        "that must fit the audited prefix (batch_docs, prefix_docs, phases, doc_chunk, seq_len) are still scaled")
    p.add_argument("--ttt-set", action="append", default=[], metavar="KEY=VALUE",
                   help="any ttt key (repeatable); phased defaults here: batches of a quarter of the prefix's documents, "
                        "2 phases over half of them, global SGD chunks of a quarter of the prefix")
    p.add_argument("--ttt-chunk-tokens", type=int, default=None, help="TTT chunk (default: the audited prefix in 4 chunks)")
    p.add_argument("--ttt-epochs", type=int, default=None)
    p.add_argument("--ttt-lr", type=float, default=None)
    p.add_argument("--batch-windows", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu (default, deterministic) | cuda | auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    if args.target == "causality":
        return run_causality(causality_parser().parse_args(args.rest))
    try:
        from pgolf.submit.audit import main as record_audit
    except ModuleNotFoundError as exc:
        if exc.name in ("pgolf.submit.audit", "pgolf.submit"):
            raise MissingDependencyError(
                f"pgolf audit {args.target}: the record audit (pgolf.submit.audit) is not in this checkout; "
                "`pgolf audit causality ...` is available"
            ) from None
        raise
    return int(record_audit([args.target, *args.rest]) or 0)


def run_causality(args: argparse.Namespace) -> int:
    import torch

    from pgolf.cli.eval import PHASED_KEYS, load_eval_inputs, ttt_config_from_args
    from pgolf.eval.causality import check_causality
    from pgolf.train.distributed import resolve_device

    if args.positions < 1:
        raise ConfigError(f"--positions: must be >= 1, got {args.positions}")
    device = resolve_device(args.device)
    model, meta, lut, seq_len, val_tokens = load_eval_inputs(args, device)
    if args.max_tokens == 0:
        val_tokens = val_tokens[: 4 * seq_len + 1]  # default prefix: 4 windows (one eval per flip)
    n = val_tokens.numel() - 1
    if args.ttt_chunk_tokens is None:
        args.ttt_chunk_tokens = max(1, n // 4)
    if args.ttt == "phased":  # scaled to the prefix so that batches, warm starts and phases all happen
        from pgolf.eval.documents import split_documents

        docs = split_documents(val_tokens, model.cfg.bos_id).count
        given = {item.partition("=")[0].strip() for item in args.ttt_set}
        scaled = {"batch_docs": max(1, docs // 4), "prefix_docs": max(1, docs // 2), "phases": 2,
                  "doc_chunk": min(48, seq_len), "seq_len": min(seq_len, max(1, n // 8))}
        args.ttt_set = [f"{k}={v}" for k, v in scaled.items() if k not in given] + list(args.ttt_set)
    ttt_cfg = ttt_config_from_args(args)
    amp = torch.bfloat16 if device.type == "cuda" else None
    modes = ("plain", "sliding", "ttt") if args.mode == "all" else (args.mode,)
    reports = []
    for mode in modes:
        if mode == "ttt" and ttt_cfg.mode == "phased":
            mode = "phased"
        rep = check_causality(
            model, val_tokens, lut, mode=mode, seq_len=seq_len, stride=min(args.stride or seq_len, seq_len),
            positions=args.positions, seed=args.seed, ttt_cfg=ttt_cfg, atol=args.atol,
            batch_windows=args.batch_windows, device=device, autocast_dtype=amp, progress=not args.json,
        )
        reports.append(rep)
        if not args.json:
            print(rep.summary())
    ok = all(r.passed for r in reports)
    if args.json:
        print_json({
            "artifact": args.artifact,
            "seq_len": seq_len,
            "stride": args.stride,
            "targets": n,
            "ttt": {"mode": ttt_cfg.mode, "chunk_tokens": ttt_cfg.chunk_tokens, "epochs": ttt_cfg.epochs, "lr": ttt_cfg.effective_lr,
                    **({k: getattr(ttt_cfg, k) for k in PHASED_KEYS} if ttt_cfg.mode == "phased" else {})},
            "passed": ok,
            "modes": [r.as_dict() for r in reports],
        })
    elif not ok:
        print("causality audit FAILED: some scored NLL changed when a later token changed", file=sys.stderr)
    return 0 if ok else 1

