"""``pgolf eval``: evaluate an artifact file on a validation glob, as JSON or a short table."""

from __future__ import annotations

import argparse
import glob as globlib
from pathlib import Path

from pgolf.cli.common import print_json
from pgolf.errors import DataError


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate an artifact (standard and sliding-window val_bpb)")
    p.add_argument("--artifact", required=True, help="a .pgolf artifact file")
    p.add_argument("--val", required=True, help="glob of validation shards, e.g. 'data/fineweb_val_*.bin'")
    p.add_argument("--tokenizer", required=True, help="SentencePiece model the shards were made with")
    p.add_argument("--seq-len", type=int, default=0, help="window length (default: the artifact's eval seq len)")
    p.add_argument("--stride", type=int, default=0, help="sliding-window stride (0: standard eval only)")
    p.add_argument("--batch-tokens", type=int, default=65536, help="tokens per standard-eval batch")
    p.add_argument("--max-tokens", type=int, default=0, help="evaluate only a prefix of the stream (smoke tests)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from pgolf.data.tokenizer import load_tokenizer
    from pgolf.eval.bpb import build_byte_lut
    from pgolf.eval.standard import evaluate_standard, load_validation_tokens
    from pgolf.submit.artifact import load_artifact_model
    from pgolf.train.distributed import resolve_device

    files = sorted(Path(p) for p in globlib.glob(args.val))
    if not files:
        raise DataError(f"no validation shards match {args.val!r}; check the glob (quote it so the shell does not expand it)")
    device = resolve_device(args.device)
    model, meta = load_artifact_model(args.artifact, device)
    model.eval()
    sp = load_tokenizer(args.tokenizer, model.cfg.vocab_size)
    lut = build_byte_lut(sp, model.cfg.vocab_size)
    seq_len = args.seq_len or int(meta.get("eval_seq_len") or meta.get("train_seq_len") or 1024)
    val_tokens = load_validation_tokens(files, seq_len, args.max_tokens)
    amp = torch.bfloat16 if device.type == "cuda" else None
    std = evaluate_standard(model.token_nll, val_tokens, seq_len, lut, batch_tokens=max(args.batch_tokens, seq_len), device=device, autocast_dtype=amp, progress=not args.json)
    out = {"artifact": args.artifact, "seq_len": seq_len, **std.as_dict(), "standard": std.as_dict()}
    if args.stride:
        from pgolf.eval.sliding import evaluate_sliding

        sl = evaluate_sliding(model.token_nll, val_tokens, seq_len, args.stride, lut, device=device, autocast_dtype=amp, progress=not args.json)
        out["sliding"] = {"stride": args.stride, **sl.as_dict()}
    if args.json:
        print_json(out)
    else:
        print(f"standard  seq_len:{seq_len} val_loss:{std.val_loss:.6f} val_bpb:{std.val_bpb:.6f} targets:{std.targets} bytes:{std.bytes}")
        if "sliding" in out:
            s = out["sliding"]
            print(f"sliding   stride:{args.stride} val_loss:{s['val_loss']:.6f} val_bpb:{s['val_bpb']:.6f} targets:{s['targets']} bytes:{s['bytes']}")
    return 0
