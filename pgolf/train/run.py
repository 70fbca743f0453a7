"""One run, end to end, around the :class:`~pgolf.train.loop.Trainer`: pre-flight checks before
the run folder is touched, resume from a checkpoint, the outcome recorded whatever happens
(``status`` lines), then averaging, the artifact (quantise, compress, write, reload into a fresh
model) and the final evaluations on the reloaded model.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from pgolf.config import RunConfig, to_dict
from pgolf.model.gpt import build_model, count_parameters
from pgolf.quant.codecs import require_export_libraries
from pgolf.train.distributed import DistContext, barrier, init_distributed, shutdown_distributed
from pgolf.train.logger import RunLogger, environment_info
from pgolf.train.loop import RunData, RunInterrupted, Trainer, TrainingDivergedError, quant_label
from pgolf.train.setup import apply_precision, autocast_dtype, autocast_reason, configure_backends


def run_training(cfg: RunConfig, run_dir: str | Path, *, code_bytes: int | None = None, predict_size: bool = True,
                 mode: str = "new", tracker: str | None = None) -> dict:
    """Train, export and evaluate one run into ``run_dir``; returns the summary dict.

    Works the same in one process and under torchrun (every rank calls it). ``code_bytes``: the
    submitted script's size (a bundled train_gpt.py passes its own); ``predict_size``: log the
    predicted artifact size at start (a bundle printed it when it was generated). ``mode``:
    ``new`` (refuses an existing run folder), ``overwrite`` (replaces it as a whole) or ``resume``
    (continues it from its newest complete checkpoint). Every pre-flight check runs before the
    folder is touched. ``tracker``: also send the metrics events to ``tensorboard`` or ``wandb``
    (:mod:`pgolf.train.tracker`; rank 0 only)."""
    from pgolf.train.checkpoint import config_hash, decode_state, latest_complete
    from pgolf.train.rundir import check_run_dir, prepare_run_dir

    run_dir = Path(run_dir)
    ctx = init_distributed(cfg.train.device, cfg.train.collective_timeout_seconds)
    try:
        check_run_dir(run_dir, mode)
        require_export_libraries(cfg.quant)  # a missing compressor fails now, not after training
        if tracker:
            from pgolf.train.tracker import require_tracker

            require_tracker(tracker)  # so does a missing tracker package
        data = RunData.load(cfg)
        resume_state = None
        if mode == "resume":
            ckpt = latest_complete(run_dir, config_hash=config_hash(to_dict(cfg)), world_size=ctx.world_size)
            resume_state = decode_state(ckpt.path / f"rank{ctx.rank}.pgolf")
        gptq = _gptq_preflight(cfg, ctx)  # (reserve, measured Hessian seconds); refuses a reserve too short for it
        barrier()  # every rank passed its checks before rank 0 writes anything
        if ctx.is_main:
            prepare_run_dir(run_dir, "resume" if mode == "resume" else mode)
        barrier()
        summary = _run(cfg, run_dir, ctx, data, resume_state, code_bytes, predict_size, gptq, tracker)
        # every rank reaches here before any tears the group down: a gloo rank that destroys its
        # group while its peer still holds pending traffic aborts at exit (SIGABRT, seen ~1 in 6)
        barrier()
        return summary
    finally:
        if ctx.distributed:
            shutdown_distributed()


def _run(cfg: RunConfig, run_dir: Path, ctx: DistContext, data: RunData, resume_state: dict | None,
         code_bytes: int | None, predict_size: bool, gptq: tuple[float, float] | None = None, tracker: str | None = None) -> dict:
    """One run with its outcome recorded: the log and metrics end with a ``status`` event
    (finished, interrupted with a checkpoint, diverged, or failed), whatever happens."""
    from pgolf.train.rundir import StopSignals

    logger = RunLogger(run_dir, enabled=ctx.is_main)
    if tracker and logger.enabled:
        from pgolf.train.tracker import open_tracker

        logger.tracker = open_tracker(tracker, run_dir, warn=lambda msg: logger.log(msg))
    config_dict = to_dict(cfg)
    if ctx.is_main and resume_state is None:
        _write_json(run_dir / "config.json", config_dict)
    logger.header(config_dict, environment_info(ctx.device))
    step_ref: dict = {}
    try:
        with StopSignals() as signals:
            summary = _train_export_evaluate(cfg, run_dir, ctx, data, resume_state, code_bytes, predict_size, logger, signals, step_ref, gptq)
        logger.log("status:finished")
        logger.metric("status", status="finished", step=summary["steps"])
    except RunInterrupted as exc:
        logger.log(f"status:interrupted step:{exc.step} resumable:true (pgolf train --resume {run_dir})")
        logger.metric("status", status="interrupted", step=exc.step, resumable=True)
        raise
    except TrainingDivergedError as exc:
        logger.log(f"status:diverged {exc}")
        logger.metric("status", status="diverged", step=step_ref.get("step"), resumable=True)
        raise
    except BaseException as exc:
        has_ckpt = (run_dir / "checkpoints").is_dir()
        logger.log(f"status:failed step:{step_ref.get('step')} error:{type(exc).__name__}: {str(exc)[:300]} resumable:{str(has_ckpt).lower()}")
        logger.metric("status", status="failed", step=step_ref.get("step"), error=type(exc).__name__, resumable=has_ckpt)
        raise
    finally:
        logger.close()
    if "budget_report" in step_ref:
        from pgolf.quant.artifact import check_budget

        check_budget(step_ref["budget_report"])  # an over-budget artifact is an error, after the run is recorded
    return summary


def _train_export_evaluate(cfg: RunConfig, run_dir, ctx, data, resume_state, code_bytes, predict_size, logger, signals, step_ref, gptq=None) -> dict:
    from pgolf.eval.suite import eval_estimate_line, final_evaluations
    from pgolf.quant.artifact import ARTIFACT_NAME, build_artifact, load_artifact_model
    from pgolf.train.checkpoint import config_hash

    wall0 = time.perf_counter()
    configure_backends(ctx.device, cfg.train.threads)
    # Code bytes: the bundled script's own size when it runs, else an upper bound of it (rank 0).
    # (a bundled script always passes its size, so it never imports the packing code)
    if code_bytes is not None:
        code = code_bytes
    else:
        from pgolf.train.codesize import package_code_bytes

        code = package_code_bytes(cfg) if ctx.is_main else 0
    if predict_size and resume_state is None:
        from pgolf.quant.predict import preflight  # warns if the artifact will not fit

        preflight(cfg, code, logger.log)
    trainer = Trainer(cfg, ctx, logger, data)
    trainer.run_dir, trainer.config_hash, trainer.signals, trainer.step_ref = run_dir, config_hash(to_dict(cfg)), signals, step_ref
    logger.log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={data.tokenizer_path} "
               f"tokenizer_sha256:{data.identity['tokenizer_sha256'][:16]}")
    if data.identity["manifest"]:
        logger.log(f"data_identity:ok manifest:{data.identity['manifest']} shards:{data.identity['shards_checked']}")
    else:
        logger.log(f"data_identity:no_manifest (no manifest.json in {cfg.data.path}: {data.identity['shards_checked']} "
                   "shard headers checked, tokenizer not verified against the shards)")
    logger.log(f"train_loader:dataset:{Path(cfg.data.path).resolve().name} train_shards:{len(trainer.train_files)}")
    logger.log(f"val_loader:shards pattern={Path(cfg.data.path) / cfg.data.val_glob} tokens:{data.val_tokens.numel() - 1}")
    if data.val_prefix:
        logger.log(f"eval_prefix:targets:{data.val_tokens.numel() - 1} of:{data.val_tokens_total - 1} (eval.max_val_tokens="
                   f"{cfg.eval.max_val_tokens}: every val_bpb of this run is a comparison on a prefix, not a score; "
                   "--set eval.max_val_tokens=0 scores the whole split)")
    trainer.build()
    if cfg.quant.rotate != "none":  # an unrotatable matrix is a ConfigError now, not after training
        from pgolf.quant.export import choose_format, rotation_for

        for name, t in trainer.base_model.state_dict().items():
            rotation_for(name, t, choose_format(name, t, cfg.quant), cfg.quant)
    counts = count_parameters(trainer.base_model)
    logger.log(f"model_params:{counts['total']}")
    logger.log(f"world_size:{ctx.world_size} grad_accum_steps:{trainer.accum}")
    o = cfg.optim
    logger.log(
        f"preset:{cfg.preset} profile:{cfg.profile} matrix_optimizer:{o.matrix_optimizer} embed_lr:{o.tied_embed_lr} "
        f"matrix_lr:{o.matrix_lr} scalar_lr:{o.scalar_lr} muon_wd:{o.muon_wd} adam_wd:{o.adam_wd} grad_clip:{o.grad_clip_norm}"
    )
    t = cfg.train
    logger.log(
        f"train_batch_tokens:{t.train_batch_tokens} train_seq_len:{t.train_seq_len} iterations:{t.iterations} "
        f"warmup_steps:{t.warmup_steps} max_wallclock_seconds:{t.max_wallclock_seconds:.3f} compile:{trainer.compiled} "
        f"autocast:{trainer.amp_dtype} ({autocast_reason(cfg.train, trainer.device)})"
    )
    if cfg.model.xsa_last_n:
        first = cfg.model.num_layers - cfg.model.xsa_last_n
        logger.log(f"XSA:last_{cfg.model.xsa_last_n} active_layers:{list(range(first, cfg.model.num_layers))}")
    if cfg.avg.ema_decay:
        logger.log(f"ema:enabled decay={cfg.avg.ema_decay}")
    if trainer.sharded and ctx.distributed and o.grad_clip_norm > 0:
        logger.log("grad_clip:sharded_muon the global norm uses each rank's own (not yet averaged) matrix gradients")
    if cfg.model.num_loops:
        logger.log(f"layer_loop:configured virtual_layers:{cfg.model.virtual_layers(True)} enable_at:{cfg.model.loop_enable_at}")
    gptq_measured = None
    if gptq is not None:  # the reserve passed the preflight of run_training (measured before the folder was touched)
        trainer.gptq_reserve, gptq_measured = gptq
        logger.log(f"gptq_reserve_seconds:{trainer.gptq_reserve:g} measured_collection:{gptq_measured:.2f}s "
                   f"(training stops that much before the cap{'; auto = measured + 20%' if cfg.quant.gptq_reserve_seconds < 0 else ''})")
    logger.log(f"seed:{t.seed}")
    warmup_s = trainer.compile_warmup()
    if warmup_s:
        import os

        logger.log(f"compile_warmup_seconds:{warmup_s:.1f} inductor_cache:{os.environ.get('TORCHINDUCTOR_CACHE_DIR', '')}")
    stats = trainer.loop(resume_state)
    tokens_seen = stats["tokens"]
    if t.schedule_steps and stats["steps"] < t.schedule_steps // 2:
        logger.log(f"WARNING: training stopped at step {stats['steps']}, far below the {t.schedule_steps} steps the step "
                   f"schedules of profile {cfg.profile} assume (train.schedule_steps): the results describe an undertrained "
                   "model; give it more time or set train.iterations with train.max_wallclock_seconds=0")
    if ctx.device.type == "cuda":
        logger.log(
            f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
            f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB"
        )

    # ---- averaging -> pre-quantisation eval of exactly the weights that get exported ----------
    if trainer.averager.tracks:  # avg.ema_tracks: the proxy on held-out training tokens picks the EMA
        if trainer.qat is not None:
            trainer.qat.set_active(False)
        logger.log(f"ema_tracks: proxy on held-out training shard {trainer.holdout_file.name} (last {cfg.avg.proxy_tokens} "
                   "tokens; the shard is held out of the loader; validation tokens are never read)")
        for line in trainer.averager.select_track(trainer.proxy_loss):
            logger.log(line)
    export_state, msg = trainer.averager.export_state(trainer.base_model)
    logger.log(msg)
    trainer.base_model.load_state_dict(export_state, strict=True)
    if trainer.qat is not None:
        trainer.qat.set_active(False)  # the float eval measures the weights, not their fake-quantised view
    trainer.train_tokens_per_second = tokens_seen / max(stats["train_seconds"], 1e-9)
    prequant = None
    if cfg.eval.diagnostic:
        logger.log(eval_estimate_line("diagnostic", data.val_tokens.numel() - 1, trainer.train_tokens_per_second))
        prequant = trainer.validate(trainer.base_model)
        logger.log(f"DIAGNOSTIC post_avg val_loss:{prequant.val_loss:.4f} val_bpb:{prequant.val_bpb:.4f} eval_time:{1000 * prequant.seconds:.0f}ms")
    else:
        logger.log("DIAGNOSTIC post_avg skipped (eval.diagnostic=false)")

    # ---- artifact: quantise, compress, write; count bytes ----------------------------------------
    artifact_path = run_dir / ARTIFACT_NAME
    label = quant_label(cfg)
    report = None
    gptq_seconds, gptq_reserve = 0.0, {}
    if ctx.is_main:
        if cfg.train.save_raw:
            _save_raw(trainer.base_model, cfg, run_dir)
        hessians = None
        if cfg.quant.gptq == "full":
            # GPTQ Hessians read training data (or sample the model): training-time ledger (field-notes 1.8)
            from pgolf.quant.calib import calibration_source
            from pgolf.quant.gptq import collect_hessians

            t_gptq = time.perf_counter()
            source = calibration_source(cfg, trainer.base_model, trainer.amp_dtype, rank=ctx.rank, world_size=ctx.world_size)
            hessians = collect_hessians(trainer.base_model, source, cfg.quant, amp_dtype=trainer.amp_dtype, progress=cfg.train.progress)
            gptq_seconds = time.perf_counter() - t_gptq
            logger.log(f"gptq_seconds:{gptq_seconds:.1f} layers:{len(hessians)} calibration:{source.describe()} "
                       f"train_time_with_gptq:{stats['train_seconds'] + gptq_seconds:.1f}s")
            if trainer.gptq_reserve is not None:
                from pgolf.quant.reserve import gptq_reserve_report

                gptq_reserve = gptq_reserve_report(trainer.gptq_reserve, gptq_seconds)
                logger.log(f"gptq_reserve:{trainer.gptq_reserve:g}s measured_at_start:{gptq_measured:.2f}s collection:{gptq_seconds:.2f}s "
                           f"within_reserve:{str(gptq_reserve['gptq_within_reserve']).lower()}")
        report, qtensors = build_artifact(export_state, cfg.model, cfg.quant, artifact_path, code_bytes=code,
                                          meta_extra=_artifact_extra(cfg, data), hessians=hessians, progress=cfg.train.progress)
        logger.log(
            f"Serialized model {label}: {report.model_bytes} bytes (payload:{report.payload_bytes} codec:{report.codec} "
            f"packing:{report.packing} choices:{report.choices})"
        )
        logger.log(f"Code size: {report.code_bytes} bytes")
        logger.log(f"Total submission size {label}: {report.total_bytes} bytes (budget {report.budget_bytes})")
        from pgolf.model.export_view import artifact_view
        from pgolf.quant.export import roundtrip_errors

        for name, err in roundtrip_errors(artifact_view(export_state, cfg.model)[0], qtensors).items():
            logger.log(f"quant_error name:{name} fmt:{err['fmt']} rel_rms:{err['rel_rms']:.3e} max_abs:{err['max_abs']:.3e}", console=False)
    barrier()

    # ---- round trip: read the file back into a fresh model and evaluate -------------------------
    fresh, _meta = load_artifact_model(artifact_path, ctx.device, cfg.model.attention_backend)
    fresh.set_eval_temperature(cfg.eval.temperature)
    apply_precision(fresh, cfg.train, ctx.device)
    finals = final_evaluations(fresh, trainer, label)

    summary = {
        "preset": cfg.preset,
        "profile": cfg.profile,
        "seed": t.seed,
        "params": counts["total"],
        "params_by_group": counts,
        "steps": stats["steps"],
        "train_seconds": stats["train_seconds"],
        "compile_warmup_seconds": warmup_s,
        "tokens_seen": tokens_seen,
        "tokens_per_second": tokens_seen / max(stats["train_seconds"], 1e-9),
        "final_train_loss": stats["final_train_loss"],
        "val_loss_prequant": prequant.val_loss if prequant is not None else None,
        "val_bpb_prequant": prequant.val_bpb if prequant is not None else None,
        **finals,
        "val_targets": finals["val_targets_roundtrip"],
        "val_bytes": finals["val_bytes_roundtrip"],
        "val_prefix": {"targets": data.val_tokens.numel() - 1, "of": data.val_tokens_total - 1} if data.val_prefix else None,
        "world_size": ctx.world_size,
        "device": str(ctx.device),
        "wall_seconds": time.perf_counter() - wall0,
    }
    if report is not None:
        summary.update(
            model_bytes=report.model_bytes,
            code_bytes=report.code_bytes,
            artifact_bytes=report.total_bytes,
            budget_bytes=report.budget_bytes,
            fits_budget=report.fits,
            artifact=ARTIFACT_NAME,
            quant_label=label,
            gptq_seconds=gptq_seconds,
            **{k: v for k, v in gptq_reserve.items() if k != "gptq_seconds"},
        )
        _write_json(run_dir / "summary.json", summary)
        logger.metric("summary", **{k: v for k, v in summary.items() if not isinstance(v, dict)})
    if report is not None:
        step_ref["budget_report"] = report  # checked after the run is recorded as finished
    return summary


def _gptq_preflight(cfg: RunConfig, ctx: DistContext) -> tuple[float, float] | None:
    """With GPTQ and a wallclock cap: time one Hessian collection (pgolf.quant.reserve) on a
    throw-away model of the run's shape on this device, the slowest rank's time on every rank, and
    refuse a reserve shorter than it (GPTQReserveError) before anything is written; -1 (auto)
    becomes the measured time + 20%. None when there is nothing to reserve."""
    if cfg.quant.gptq != "full" or cfg.train.max_wallclock_seconds <= 0:
        return None
    import torch.distributed as dist

    from pgolf.quant.reserve import gptq_preflight

    def reduce_max(x: float) -> float:
        t = torch.tensor(float(x), dtype=torch.float64, device=ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    configure_backends(ctx.device, cfg.train.threads)
    model = build_model(cfg.model, ctx.device)
    apply_precision(model, cfg.train, ctx.device)
    try:
        return gptq_preflight(model, cfg, autocast_dtype(cfg.train, ctx.device), rank=ctx.rank, world_size=ctx.world_size,
                              reduce_max=reduce_max if ctx.distributed else None)
    finally:
        del model
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def _save_raw(model: nn.Module, cfg: RunConfig, run_dir: Path) -> None:
    """The unquantised exported weights, in the same container (no pickle), for re-exports."""
    from pgolf.quant.container import ChunkPlan, encode_artifact, write_bytes_atomic
    from pgolf.quant.export import QTensor, dtype_name
    from pgolf.quant.artifact import artifact_meta

    from pgolf.model.export_view import artifact_view

    state, model_cfg = artifact_view(model.state_dict(), cfg.model)  # the exported model's tensors and config
    qts = [QTensor(k, tuple(v.shape), dtype_name(v.dtype), "raw", v.detach().cpu().contiguous()) for k, v in state.items()]
    blob = encode_artifact(qts, artifact_meta(model_cfg, {**_artifact_extra(cfg), "raw": True}), ChunkPlan(default_codec="none"))
    write_bytes_atomic(run_dir / "final_model.raw.pgolf", blob)


def _artifact_extra(cfg: RunConfig, data: RunData | None = None) -> dict:
    """What an artifact records beyond the model shape: enough to evaluate it the same way, and
    the tokenizer it was trained with (``pgolf eval`` refuses another)."""
    extra = {"preset": cfg.preset, "profile": cfg.profile, "train_seq_len": cfg.train.train_seq_len, "eval_seq_len": cfg.eval_seq_len}
    if cfg.eval.temperature != 1.0:
        extra["eval_temperature"] = cfg.eval.temperature  # pgolf eval scores the artifact at the run's temperature
    if data is not None:
        extra["tokenizer_sha256"] = data.identity["tokenizer_sha256"]
    return extra


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n", encoding="utf-8")
    os.replace(tmp, path)
