"""The evaluations that end a run, on the model reloaded from the artifact file, with the
challenge's final log-line names:

* ``final_<label>_roundtrip[_exact]``: the standard (non-overlapping) eval;
* ``final_<label>_sliding_window[_exact]`` when ``eval.sliding_stride`` > 0: the exact
  sliding-window eval (the records' score);
* ``legal_ttt[_exact]`` when ``ttt.mode`` is not ``off``: score-first test-time training on a
  copy of the model (the artifact's weights are never changed); for ``phased`` also one
  ``legal_ttt_phase`` line per global SGD phase and one ``legal_ttt_segment`` line (bpb) per
  stretch of documents between phases;
* ``eval_estimate_8xh100`` (runs with the ``8xh100`` profile): the FLOP-based 8xH100 time of
  these evaluations on the official validation split, and whether they fit the 600 s limit.
  ``pgolf eval`` prints it for any artifact.
"""

from __future__ import annotations

from typing import Any

# ``Trainer`` (pgolf.train.loop) and ``RunConfig`` (pgolf.config) in the annotations below are names
# only, never imported: eval sits below train and config in the layers. The bundle's config folding
# (pgolf.train.fold) resolves annotation names by class name across the bundled sources.


def eval_estimate_line(what: str, targets: int, train_tokens_per_second: float, factor: float = 1.0) -> str:
    """The log line printed before an evaluation: its expected time from the run's own training
    rate (a forward costs about a third of a training step; ``factor``: tokens processed per scored
    target, seq_len / stride for the sliding eval). Unknown rate: says so."""
    if train_tokens_per_second <= 0:
        return f"eval_estimate pass:{what} targets:{targets} seconds:unknown (no training rate measured)"
    seconds = targets * factor / (3.0 * train_tokens_per_second)
    return f"eval_estimate pass:{what} targets:{targets} seconds:~{seconds:.0f} (from this run's training rate)"


def final_evaluations(model, trainer: Trainer, label: str) -> dict[str, Any]:
    """Run the configured final evaluations; returns the summary keys (every rank calls it).
    ``trainer`` supplies cfg, ctx, logger, val_tokens, lut, amp_dtype and ``validate``."""
    cfg, log, ctx = trainer.cfg, trainer.logger, trainer.ctx
    progress = bool(cfg.train.progress and ctx.is_main)
    rate = getattr(trainer, "train_tokens_per_second", 0.0)
    n_targets = trainer.val_tokens.numel() - 1
    log.log(eval_estimate_line("roundtrip", n_targets, rate))
    res = trainer.validate(model)
    log.log(f"final_{label}_roundtrip val_loss:{res.val_loss:.4f} val_bpb:{res.val_bpb:.4f} eval_time:{1000 * res.seconds:.0f}ms")
    log.log(f"final_{label}_roundtrip_exact val_loss:{res.val_loss:.8f} val_bpb:{res.val_bpb:.8f}")
    out: dict[str, Any] = {
        "val_loss_roundtrip": res.val_loss,
        "val_bpb_roundtrip": res.val_bpb,
        "eval_seconds_roundtrip": res.seconds,
        "val_targets_roundtrip": res.targets,
        "val_bytes_roundtrip": res.bytes,
    }
    seq_len, stride = cfg.eval_seq_len, cfg.eval.sliding_stride
    common = dict(
        batch_windows=cfg.eval.sliding_batch_windows,
        device=ctx.device,
        rank=ctx.rank,
        world_size=ctx.world_size,
        autocast_dtype=trainer.amp_dtype,
        progress=progress,
    )
    was_training = model.training
    model.eval()
    if stride > 0:
        from pgolf.eval.sliding import evaluate_sliding, sliding_plan

        log.log(eval_estimate_line("sliding", n_targets, rate, factor=seq_len / stride))

        sl = evaluate_sliding(model.token_nll, trainer.val_tokens, seq_len, stride, trainer.lut, **common)
        plan = sliding_plan(sl.targets, seq_len, stride)
        log.log(
            f"final_{label}_sliding_window stride:{stride} val_loss:{sl.val_loss:.4f} val_bpb:{sl.val_bpb:.4f} "
            f"eval_time:{1000 * sl.seconds:.0f}ms targets:{sl.targets} bytes:{sl.bytes} windows:{plan.num_windows}"
        )
        log.log(f"final_{label}_sliding_window_exact val_loss:{sl.val_loss:.8f} val_bpb:{sl.val_bpb:.8f}")
        out.update(
            val_loss_sliding=sl.val_loss,
            val_bpb_sliding=sl.val_bpb,
            sliding_stride=stride,
            eval_seconds_sliding=sl.seconds,
            val_targets_sliding=sl.targets,
            val_bytes_sliding=sl.bytes,
        )
    if cfg.ttt.mode == "phased":
        out.update(_phased(model, trainer, common))
    elif cfg.ttt.mode != "off":
        from pgolf.eval.ttt import evaluate_ttt

        t = cfg.ttt
        ttt_stride = stride or seq_len
        outcome = evaluate_ttt(model, trainer.val_tokens, trainer.lut, t, seq_len=seq_len, stride=ttt_stride, **common)
        r = outcome.result
        log.log(
            f"legal_ttt mode:{t.mode} chunk:{t.chunk_tokens} epochs:{t.epochs} lr:{t.effective_lr} stride:{ttt_stride} "
            f"val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f} eval_time:{1000 * r.seconds:.0f}ms "
            f"chunks:{outcome.chunks} steps:{outcome.optimizer_steps} train_time:{1000 * outcome.train_seconds:.0f}ms"
        )
        log.log(f"legal_ttt_exact val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f}")
        out.update(
            val_loss_ttt=r.val_loss,
            val_bpb_ttt=r.val_bpb,
            ttt_mode=t.mode,
            eval_seconds_ttt=r.seconds,
            ttt_train_seconds=outcome.train_seconds,
            ttt_chunks=outcome.chunks,
            val_targets_ttt=r.targets,
        )
    model.train(was_training)
    if cfg.profile == "8xh100":
        out.update(_estimate(cfg, log, trainer.val_tokens))
    return out


def _phased(model, trainer: Trainer, common: dict[str, Any]) -> dict[str, Any]:
    """Phased TTT (R6/R7): ``legal_ttt`` lines as the other TTT modes, plus one line per phase."""
    from pgolf.eval.phased import evaluate_phased

    cfg, log = trainer.cfg, trainer.logger
    t = cfg.ttt
    show = log.log if common["progress"] else None
    o = evaluate_phased(model, trainer.val_tokens, trainer.lut, t, seq_len=cfg.eval_seq_len, device=common["device"],
                        rank=common["rank"], world_size=common["world_size"], autocast_dtype=common["autocast_dtype"],
                        bos_id=cfg.model.bos_id, progress=show)
    r = o.result
    for p in o.phases:
        log.log(f"legal_ttt_phase phase:{p.phase} docs:{p.boundary_docs} after_batch:{p.after_batch} tokens:{p.tokens} "
                f"sgd_steps:{p.sgd_steps} sgd_time:{1000 * p.sgd_seconds:.0f}ms")
    for seg in o.segments:
        if "val_bpb" in seg:
            log.log(f"legal_ttt_segment after_phase:{seg['after_phase']} docs:{seg['docs']} targets:{seg['targets']} "
                    f"val_loss:{seg['val_loss']:.4f} val_bpb:{seg['val_bpb']:.4f} score_time:{1000 * seg['score_seconds']:.0f}ms")
    log.log(
        f"legal_ttt mode:phased docs:{o.documents} batch_docs:{t.batch_docs} chunk:{t.doc_chunk} rank:{t.doc_lora_rank} "
        f"lr:{t.doc_lora_lr} phases:{len(o.phases)}/{t.phases} prefix_docs:{t.prefix_docs} "
        f"val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f} eval_time:{1000 * r.seconds:.0f}ms "
        f"lora_steps:{o.lora_steps} sgd_time:{1000 * o.sgd_seconds:.0f}ms"
    )
    log.log(f"legal_ttt_exact val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f}")
    return dict(
        val_loss_ttt=r.val_loss,
        val_bpb_ttt=r.val_bpb,
        ttt_mode="phased",
        eval_seconds_ttt=r.seconds,
        ttt_train_seconds=o.sgd_seconds,
        ttt_documents=o.documents,
        ttt_phases=[p.as_dict() for p in o.phases],
        ttt_segments=o.segments,
        val_targets_ttt=r.targets,
    )


def _estimate(cfg: RunConfig, log, val_tokens=None) -> dict[str, Any]:
    """The 8xH100 estimate, labelled as an estimate (cheap: FLOPs counted on the meta device)."""
    from pgolf.eval.budget import estimate_8xh100

    lengths = None
    if cfg.ttt.mode == "phased":
        from pgolf.eval.documents import split_documents

        lengths = split_documents(val_tokens.cpu(), cfg.model.bos_id).lengths.numpy()
    est = estimate_8xh100(cfg.model, cfg.eval_seq_len, cfg.eval.sliding_stride, cfg.ttt, doc_lengths=lengths,
                          caseops=cfg.data.transform != "none")
    log.log(est.log_line())
    return {
        "eval_estimate_8xh100_seconds": est.total_s,
        "eval_estimate_8xh100_fits": est.fits,
        "eval_estimate_8xh100": est.as_dict(),
    }
