"""``pgolf eval``: evaluate an artifact file on a validation glob: the standard eval, the exact
sliding-window eval (the records' score) and optionally test-time training (score-first sgd/lora,
or the phased protocol of R6/R7: ``--ttt phased``, the records' ``TTT_EVAL_ONLY``), each
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
    p.add_argument("--allow-train-shards", action="store_true",
                   help="score training shards given as --val (a loss on seen tokens, never a val_bpb to report)")
    p.add_argument("--seq-len", type=int, default=0, help="window length (default: the artifact's eval seq len)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default 64, the records', or the window if shorter; 0: standard eval only)")
    p.add_argument("--batch-tokens", type=int, default=65536, help="tokens per standard-eval batch")
    p.add_argument("--batch-windows", type=int, default=32, help="sliding windows per forward")
    p.add_argument("--max-tokens", type=int, default=0, help="evaluate only a prefix of the stream (smoke tests; not a score)")
    p.add_argument("--ttt", choices=("off", "sgd", "lora", "phased"), default="off",
                   help="also run test-time training: score-first sgd/lora, or phased (R6/R7: per-document LoRA + global SGD phases)")
    p.add_argument("--ttt-chunk-tokens", type=int, default=None, help="TTT chunk size in targets (default 32768)")
    p.add_argument("--ttt-epochs", type=int, default=None, help="TTT epochs per chunk (default 3)")
    p.add_argument("--ttt-lr", type=float, default=None, help="TTT learning rate (default 0.002 for sgd, 0.5 for lora)")
    p.add_argument("--ttt-lora-rank", type=int, default=None, help="LoRA rank (default 8)")
    p.add_argument("--ttt-lora-targets", default=None, help="comma-separated linear names for LoRA (default c_q,c_v)")
    p.add_argument("--ttt-preset", default=None, help="take the [ttt] values of a preset (e.g. pr1787 for R6's phased TTT); other --ttt* options apply on top")
    p.add_argument("--ttt-set", action="append", default=[], metavar="KEY=VALUE",
                   help="any ttt key, e.g. --ttt-set prefix_docs=2000 --ttt-set doc_beta2=0.999 (repeatable)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--autocast", choices=("auto", "bf16", "off"), default="auto",
                   help="bf16 autocast: auto = the training rule (CUDA, or a CPU with native bf16), as train.autocast=auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


PHASED_KEYS = ("batch_docs", "doc_chunk", "grad_steps", "doc_lora_rank", "doc_lora_alpha", "doc_lora_lr", "doc_lora_targets",
               "doc_beta2", "doc_weight_decay", "doc_eps", "warm_start_a", "prefix_docs", "phases", "global_lr",
               "global_epochs", "chunk_tokens", "momentum", "grad_clip", "batch_seqs", "seq_len")


def ttt_config_from_args(args: argparse.Namespace):
    """A validated TTTConfig from the ``--ttt*`` options (defaults: the recorded recipe)."""
    from pgolf.config import RunConfig, apply_table, parse_set_args, read_recipe, set_value

    run_cfg = RunConfig()
    if getattr(args, "ttt_preset", None):
        apply_table(run_cfg, {"ttt": read_recipe("presets", args.ttt_preset).get("ttt", {})}, f"preset {args.ttt_preset}")
    cfg = run_cfg.ttt
    cfg.mode = args.ttt
    phased = cfg.mode == "phased"
    if args.ttt_chunk_tokens is not None:
        cfg.chunk_tokens = args.ttt_chunk_tokens
    if args.ttt_epochs is not None:
        if phased:
            cfg.global_epochs = args.ttt_epochs
        else:
            cfg.epochs = args.ttt_epochs
    if args.ttt_lr is not None:
        if cfg.mode == "lora":
            cfg.lora_lr = args.ttt_lr
        elif phased:
            cfg.doc_lora_lr = args.ttt_lr
        else:
            cfg.lr = args.ttt_lr
    if getattr(args, "ttt_lora_rank", None) is not None:
        if phased:
            cfg.doc_lora_rank = args.ttt_lora_rank
        else:
            cfg.lora_rank = args.ttt_lora_rank
    if getattr(args, "ttt_lora_targets", None):
        names = [t.strip() for t in args.ttt_lora_targets.split(",") if t.strip()]
        if phased:
            cfg.doc_lora_targets = names
        else:
            cfg.lora_targets = names
    items = getattr(args, "ttt_set", None) or []
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"--ttt-set {item!r}: expected KEY=VALUE, e.g. --ttt-set prefix_docs=2000")
    for key, value in parse_set_args([f"ttt.{item.strip()}" for item in items]):
        set_value(run_cfg, key, value)
    cfg.validate()
    return cfg


def check_artifact_tokenizer(meta: dict, tokenizer: str) -> None:
    """DataError when the artifact records the sha256 of the tokenizer it was trained with and
    ``tokenizer`` is another file: the bytes of the metric would belong to another vocabulary."""
    from pgolf.data.tokenizer import sha256_file

    want = meta.get("tokenizer_sha256")
    if not want:
        return  # artifacts written before the tokenizer was recorded
    have = sha256_file(tokenizer)
    if have != want:
        raise DataError(f"--tokenizer {tokenizer} (sha256 {have[:12]}) is not the tokenizer this artifact was trained with "
                        f"(sha256 {want[:12]}); pass the run's tokenizer (its data folder's .model file)")


def load_eval_inputs(args: argparse.Namespace, device):
    """(model, meta, lut, seq_len, val_tokens) for an artifact, a val glob and a tokenizer."""
    from pgolf.data.tokenizer import load_tokenizer
    from pgolf.eval.bpb import load_byte_counter
    from pgolf.eval.standard import load_validation_tokens
    from pgolf.quant.artifact import load_artifact_model

    files = sorted(Path(p) for p in globlib.glob(args.val) if "_bytes_" not in Path(p).name)  # byte sidecars are not shards
    if not files:
        raise DataError(f"no validation shards match {args.val!r}; check the glob (quote it so the shell does not expand it)")
    trained_on = [f for f in files if f.name.startswith("fineweb_train_")]
    if trained_on and not getattr(args, "allow_train_shards", False):  # a score on training tokens is not a val_bpb
        raise DataError(f"--val {args.val!r} matches training shards ({trained_on[0].name}, ...); "
                        "pass the validation shards, e.g. --val 'DATA/fineweb_val_*.bin' (or --allow-train-shards to score them anyway)")
    model, meta = load_artifact_model(args.artifact, device)
    model.eval()
    model.set_eval_temperature(float(meta.get("eval_temperature", 1.0)))  # eval.temperature of the run
    check_artifact_tokenizer(meta, args.tokenizer)
    sp = load_tokenizer(args.tokenizer, model.cfg.vocab_size)
    seq_len = args.seq_len or int(meta.get("eval_seq_len") or meta.get("train_seq_len") or 1024)
    val_tokens = load_validation_tokens(files, seq_len, args.max_tokens)
    lut = load_byte_counter(sp, model.cfg.vocab_size, files, val_tokens)  # the byte sidecar where the data has one
    return model, meta, lut, seq_len, val_tokens


def run(args: argparse.Namespace) -> int:
    from pgolf.eval.bpb import SidecarBytes
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
        from pgolf.train.config import TrainConfig
        from pgolf.train.setup import autocast_dtype

        amp = autocast_dtype(TrainConfig(autocast=args.autocast), device)  # the same rule as training
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
        if ttt_cfg.mode == "phased":
            import sys

            from pgolf.eval.phased import evaluate_phased

            say = (lambda line: print(line, file=sys.stderr, flush=True)) if ctx.is_main else None
            o = evaluate_phased(model, val_tokens, lut, ttt_cfg, seq_len=seq_len, device=device, rank=ctx.rank,
                                world_size=ctx.world_size, autocast_dtype=amp, bos_id=model.cfg.bos_id, progress=say)
            out["ttt"] = {"mode": "phased", **o.as_dict(), "config": {k: getattr(ttt_cfg, k) for k in PHASED_KEYS}}
        elif ttt_cfg.mode != "off":
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
        lengths = None
        if ttt_cfg.mode == "phased":
            from pgolf.eval.documents import split_documents

            lengths = split_documents(val_tokens, model.cfg.bos_id).lengths.numpy()
        caseops = isinstance(lut, SidecarBytes)  # the byte sidecar comes with the CaseOps data
        est = estimate_8xh100(model.cfg, seq_len, args.stride, ttt_cfg, doc_lengths=lengths, caseops=caseops)
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
    if "ttt" in out and out["ttt"]["mode"] == "phased":
        t = out["ttt"]
        print(f"ttt phased docs:{t['documents']} batches:{t['batches']} phases:{len(t['phases'])} val_loss:{t['val_loss']:.6f} "
              f"val_bpb:{t['val_bpb']:.6f} eval_time:{t['eval_seconds']:.1f}s (global SGD {t['sgd_seconds']:.1f}s, {t['lora_steps']} LoRA steps)")
        for seg in t["segments"]:
            if "val_bpb" in seg:
                print(f"  after phase {seg['after_phase']}: {seg['docs']} docs val_bpb:{seg['val_bpb']:.6f} score_time:{seg['score_seconds']:.1f}s")
    elif "ttt" in out:
        t = out["ttt"]
        print(f"ttt {t['mode']:<5} chunk:{t['chunk_tokens']} val_loss:{t['val_loss']:.6f} val_bpb:{t['val_bpb']:.6f} eval_time:{t['eval_seconds']:.1f}s (training {t['train_seconds']:.1f}s)")
    print(est.log_line())
    return 0
