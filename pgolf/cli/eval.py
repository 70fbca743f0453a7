"""``pgolf eval``: evaluate an artifact file on a validation glob: the standard eval, the exact
sliding-window eval (the records' score) and optionally score-first test-time training, each
with its wall time, plus the FLOP-based 8xH100 time estimate. JSON or a short table.

Runs alone or under ``torchrun --nproc_per_node=K -m pgolf eval ...`` (windows split across
ranks, sums all-reduced; rank 0 prints).
"""

from __future__ import annotations

import argparse
import glob as globlib
from pathlib import Path

from pgolf.cli.common import print_json
from pgolf.errors import ConfigError, DataError


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate an artifact (standard, sliding-window and TTT val_bpb)")
    p.add_argument("--artifact", required=True, help="a .pgolf artifact file")
    p.add_argument("--val", required=True, help="glob of validation shards, e.g. 'data/fineweb_val_*.bin'")
    p.add_argument("--tokenizer", required=True, help="SentencePiece model the shards were made with")
    p.add_argument("--seq-len", type=int, default=0, help="window length (default: the artifact's eval seq len)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default 64, the records', or the window if shorter; 0: standard eval only)")
    p.add_argument("--batch-tokens", type=int, default=65536, help="tokens per standard-eval batch")
    p.add_argument("--batch-windows", type=int, default=32, help="sliding windows per forward")
    p.add_argument("--max-tokens", type=int, default=0, help="evaluate only a prefix of the stream (smoke tests; not a score)")
    p.add_argument("--ttt", choices=("off", "sgd", "lora"), default="off", help="also run score-first test-time training")
    p.add_argument("--ttt-chunk-tokens", type=int, default=None, help="TTT chunk size in targets (default 32768)")
    p.add_argument("--ttt-epochs", type=int, default=None, help="TTT epochs per chunk (default 3)")
    p.add_argument("--ttt-lr", type=float, default=None, help="TTT learning rate (default 0.002 for sgd, 0.5 for lora)")
    p.add_argument("--ttt-lora-rank", type=int, default=None, help="LoRA rank (default 8)")
    p.add_argument("--ttt-lora-targets", default=None, help="comma-separated linear names for LoRA (default c_q,c_v)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--autocast", choices=("auto", "bf16", "off"), default="auto",
                   help="bf16 autocast: auto = on for CUDA (use bf16 to match a run trained with train.autocast=bf16 on CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def ttt_config_from_args(args: argparse.Namespace):
    """A validated TTTConfig from the ``--ttt*`` options (defaults: the recorded recipe)."""
    from pgolf.eval.config import TTTConfig

    cfg = TTTConfig(mode=args.ttt)
    if args.ttt_chunk_tokens is not None:
        cfg.chunk_tokens = args.ttt_chunk_tokens
    if args.ttt_epochs is not None:
        cfg.epochs = args.ttt_epochs
    if args.ttt_lr is not None:
        if cfg.mode == "lora":
            cfg.lora_lr = args.ttt_lr
        else:
            cfg.lr = args.ttt_lr
    if getattr(args, "ttt_lora_rank", None) is not None:
        cfg.lora_rank = args.ttt_lora_rank
    if getattr(args, "ttt_lora_targets", None):
        cfg.lora_targets = [t.strip() for t in args.ttt_lora_targets.split(",") if t.strip()]
    cfg.validate()
    return cfg


def load_eval_inputs(args: argparse.Namespace, device):
    """(model, meta, lut, seq_len, val_tokens) for an artifact, a val glob and a tokenizer."""
    from pgolf.data.tokenizer import load_tokenizer
    from pgolf.eval.bpb import build_byte_lut
    from pgolf.eval.standard import load_validation_tokens
    from pgolf.submit.artifact import load_artifact_model

    files = sorted(Path(p) for p in globlib.glob(args.val))
    if not files:
        raise DataError(f"no validation shards match {args.val!r}; check the glob (quote it so the shell does not expand it)")
    model, meta = load_artifact_model(args.artifact, device)
    model.eval()
    sp = load_tokenizer(args.tokenizer, model.cfg.vocab_size)
    lut = build_byte_lut(sp, model.cfg.vocab_size)
    seq_len = args.seq_len or int(meta.get("eval_seq_len") or meta.get("train_seq_len") or 1024)
    val_tokens = load_validation_tokens(files, seq_len, args.max_tokens)
    return model, meta, lut, seq_len, val_tokens


def run(args: argparse.Namespace) -> int:
    import torch

    from pgolf.eval.budget import estimate_8xh100
    from pgolf.eval.sliding import evaluate_sliding, sliding_plan
    from pgolf.eval.standard import evaluate_standard
    from pgolf.train.distributed import init_distributed, shutdown_distributed

    ttt_cfg = ttt_config_from_args(args)
    ctx = init_distributed(args.device)
    try:
        device = ctx.device
        model, meta, lut, seq_len, val_tokens = load_eval_inputs(args, device)
        if args.stride is None:
            args.stride = min(64, seq_len)
        if args.stride and not 1 <= args.stride <= seq_len:
            raise ConfigError(f"--stride {args.stride}: must be between 1 and the sequence length {seq_len} (0 turns the sliding eval off)")
        amp = torch.bfloat16 if args.autocast == "bf16" or (args.autocast == "auto" and device.type == "cuda") else None
        show = not args.json and ctx.is_main
        dist_kw = dict(device=device, rank=ctx.rank, world_size=ctx.world_size, autocast_dtype=amp, progress=show)
        std = evaluate_standard(model.token_nll, val_tokens, seq_len, lut, batch_tokens=max(args.batch_tokens, seq_len), **dist_kw)
        out: dict = {
            "artifact": args.artifact,
            "seq_len": seq_len,
            "device": str(device),
            "autocast": str(amp).replace("torch.", "") if amp else "off",
            "world_size": ctx.world_size,
            **std.as_dict(),
            "standard": std.as_dict(),
        }
        if args.stride:
            sl = evaluate_sliding(model.token_nll, val_tokens, seq_len, args.stride, lut, batch_windows=args.batch_windows, **dist_kw)
            plan = sliding_plan(sl.targets, seq_len, args.stride)
            out["sliding"] = {"stride": args.stride, **sl.as_dict(), "windows": plan.num_windows, "tokens_processed": plan.tokens_processed}
        if ttt_cfg.mode != "off":
            from pgolf.eval.ttt import evaluate_ttt

            stride = args.stride or seq_len
            o = evaluate_ttt(model, val_tokens, lut, ttt_cfg, seq_len=seq_len, stride=stride, batch_windows=args.batch_windows, **dist_kw)
            out["ttt"] = {
                "mode": ttt_cfg.mode,
                "stride": stride,
                "chunk_tokens": ttt_cfg.chunk_tokens,
                "epochs": ttt_cfg.epochs,
                "lr": ttt_cfg.effective_lr,
                **o.result.as_dict(),
                "chunks": o.chunks,
                "optimizer_steps": o.optimizer_steps,
                "train_seconds": o.train_seconds,
            }
        est = estimate_8xh100(model.cfg, seq_len, args.stride, ttt_cfg)
        out["estimate_8xh100"] = est.as_dict()
    finally:
        if ctx.distributed:
            shutdown_distributed()
    if not ctx.is_main:
        return 0
    if args.json:
        print_json(out)
        return 0
    prefix = " (prefix only: not a score)" if args.max_tokens else ""
    print(f"artifact {args.artifact}  seq_len:{seq_len}  targets:{std.targets}  bytes:{std.bytes}{prefix}")
    print(f"standard  val_loss:{std.val_loss:.6f} val_bpb:{std.val_bpb:.6f} eval_time:{std.seconds:.1f}s")
    if "sliding" in out:
        s = out["sliding"]
        print(f"sliding   stride:{s['stride']} val_loss:{s['val_loss']:.6f} val_bpb:{s['val_bpb']:.6f} eval_time:{s['eval_seconds']:.1f}s windows:{s['windows']}")
    if "ttt" in out:
        t = out["ttt"]
        print(f"ttt {t['mode']:<5} chunk:{t['chunk_tokens']} val_loss:{t['val_loss']:.6f} val_bpb:{t['val_bpb']:.6f} eval_time:{t['eval_seconds']:.1f}s (training {t['train_seconds']:.1f}s)")
    print(est.log_line())
    return 0
