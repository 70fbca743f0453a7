"""The training loop of one run: checked data, model, optimizers, the wallclock-capped loop, its
checkpoints and stop decisions (``pgolf.train.run`` wraps it into a whole run: pre-flight, the
artifact and the final evaluations).

Order of one step (PR #401's order; the baseline is the same minus averaging and QAT):
  scale = lr_scale(training time); late QAT may switch on; forward/backward over grad-accum
  micro-batches (DDP syncs on the last); Muon momentum warm-up; lr = base_lr * scale; clip the
  global grad norm; step every optimizer; EMA/SWA; log; all-ranks "reached the cap" flag.
Validation time is excluded from the training clock, as is the compile warm-up, whose 20 steps
are rolled back (model, optimizer state and data loader) before the clock starts.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pgolf.config import RunConfig
from pgolf.data.loaders import TrainLoader, build_loader
from pgolf.data.shards import resolve_shards, shard_token_count
from pgolf.errors import ConfigError, UserError
from pgolf.eval.bpb import ByteCounter, load_byte_counter
from pgolf.eval.standard import evaluate_standard, load_validation_tokens
from pgolf.model.gpt import build_model
from pgolf.optim.groups import build_optimizers, matrix_optimizer, replicated_parameters
from pgolf.optim.schedule import lr_scale, lr_scale_d2z, lr_scale_frac, muon_momentum, muon_wd_multiplier, training_fraction
from pgolf.train.averaging import WeightAverager
from pgolf.train.curriculum import Curriculum
from pgolf.train.distributed import DistContext, barrier, seed_everything
from pgolf.train.logger import RunLogger
from pgolf.train.setup import apply_precision, autocast_dtype, maybe_compile, use_compile


def resolve_data(cfg: RunConfig):
    """Training shards, validation shards and the tokenizer, each checked (clear errors)."""
    from pgolf.data.tokenizer import load_tokenizer

    data_dir = Path(cfg.data.path)
    train_files = resolve_shards(data_dir, cfg.data.train_glob, "training")
    val_files = resolve_shards(data_dir, cfg.data.val_glob, "validation")
    overlap = set(train_files) & set(val_files)
    if overlap:
        raise ConfigError(f"data.train_glob and data.val_glob both match {sorted(overlap)[0]}: validation tokens never train")
    if cfg.data.tokenizer:
        tok_path = Path(cfg.data.tokenizer)
    else:
        from pgolf.data.manifest import tokenizer_path_for

        tok_path = tokenizer_path_for(data_dir)
    sp = load_tokenizer(tok_path, cfg.model.vocab_size)
    return train_files, val_files, tok_path, sp


def grad_accum_steps(cfg: RunConfig, world_size: int) -> int:
    base = cfg.train.grad_accum_base
    if base % world_size and world_size % base:
        raise ConfigError(f"train.grad_accum_base={base} must be a multiple of the world size {world_size}")
    accum = max(base // world_size, 1)
    per_micro = cfg.train.train_batch_tokens // (world_size * accum)
    if cfg.train.train_batch_tokens % (world_size * accum) or per_micro % cfg.train.train_seq_len:
        raise ConfigError(
            f"train.train_batch_tokens={cfg.train.train_batch_tokens} must split into whole sequences of "
            f"{cfg.train.train_seq_len} over {world_size} rank(s) x {accum} micro-steps"
        )
    return accum


def quant_label(cfg: RunConfig) -> str:
    """Name used in the final log lines, following the challenge scripts: int8_zlib (baseline),
    int6 (PR #201/#401 style), ..."""
    from pgolf.quant.formats import parse_format

    fmt = parse_format(cfg.quant.mlp_format)
    base = f"int{fmt.bits}" if fmt.kind == "int" else fmt.spec()
    return base + ("_zlib" if cfg.quant.codec == "zlib-9" else "")


@dataclass
class RunData:
    """The checked inputs of a run: training shards, the validation stream and its byte tables."""

    train_files: list[Path]
    val_tokens: torch.Tensor  # int64, a whole number of eval windows + 1
    lut: ByteCounter  # the byte sidecar where the data has one, else the official LUT rule
    tokenizer_path: Path
    identity: dict  # what pgolf.data.identity checked: manifest, tokenizer sha256
    val_tokens_total: int = 0  # tokens of the whole validation split (val_tokens may be a prefix of it)
    max_val_tokens: int = 0  # eval.max_val_tokens

    @property
    def val_prefix(self) -> bool:
        """True when eval.max_val_tokens cut the split: the scores are a comparison, not a val_bpb."""
        return self.max_val_tokens > 0 and self.val_tokens_total - 1 > self.max_val_tokens

    @staticmethod
    def load(cfg: RunConfig) -> "RunData":
        from pgolf.data.identity import check_data_identity

        train_files, val_files, tok_path, sp = resolve_data(cfg)
        identity = check_data_identity(cfg.data.path, train_files, val_files, tok_path)
        val_len = max(cfg.train.train_seq_len, cfg.eval_seq_len)
        val_tokens = load_validation_tokens(val_files, val_len, cfg.eval.max_val_tokens)
        lut = load_byte_counter(sp, cfg.model.vocab_size, val_files, val_tokens, cfg.data.path)
        total = sum(shard_token_count(f) for f in val_files)
        return RunData(train_files, val_tokens, lut, tok_path, identity, val_tokens_total=total, max_val_tokens=cfg.eval.max_val_tokens)


class Trainer:
    def __init__(self, cfg: RunConfig, ctx: DistContext, logger: RunLogger, data: RunData):
        self.cfg, self.ctx, self.logger = cfg, ctx, logger
        self.train_files, self.val_tokens, self.lut = data.train_files, data.val_tokens, data.lut
        self.device = ctx.device
        self.amp_dtype = autocast_dtype(cfg.train, self.device)
        self.accum = grad_accum_steps(cfg, ctx.world_size)
        self.curriculum = Curriculum(cfg.train, ctx.world_size, self.accum)  # batch and length of each step
        self.gptq_reserve: float | None = None  # set by the GPTQ preflight (pgolf.quant.reserve) before the clock starts
        self.holdout_file: Path | None = None  # avg.ema_tracks: the training shard held out for the proxy
        if cfg.avg.ema_tracks:
            from pgolf.data.holdout import holdout_split

            self.train_files, self.holdout_file = holdout_split(self.train_files)

    # --------------------------------------------------------------------------------------------
    def build(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        seed_everything(cfg.train.seed)
        self.base_model = build_model(cfg.model, self.device)
        self.base_model.set_eval_temperature(cfg.eval.temperature)  # token_nll only: training uses forward
        # Layer loops switch on at a training fraction; the model is built in its evaluation state
        # (loops on), so training starts from the loop-free list (frontier.md 3.1).
        self.loops_pending = cfg.model.num_loops > 0 and cfg.model.loop_enable_at > 0
        if self.loops_pending:
            self.base_model.set_looping(False)
        apply_precision(self.base_model, cfg.train, self.device)
        self.qat = None
        if cfg.quant.qat != "off":
            from pgolf.quant.qat import attach_qat

            self.qat = attach_qat(self.base_model, cfg.quant)
        self.compiled = use_compile(cfg.train, self.device)
        model: nn.Module = maybe_compile(self.base_model, self.compiled)
        # Sharded Muon (R1, R6/R7) reduce-scatters its own gradients and the replicated parameters
        # are all-reduced in packed calls, so DDP is not used there (frontier.md 3.9).
        self.sharded = cfg.optim.muon_layout == "sharded"
        if ctx.distributed and not self.sharded:
            model = DDP(model, device_ids=[ctx.local_rank] if self.device.type == "cuda" else None, broadcast_buffers=False)
        self.model = model
        self.optimizers = build_optimizers(self.base_model, cfg.optim, cfg.model.tie_embeddings, fused=self.device.type == "cuda")
        self.muon = matrix_optimizer(self.optimizers)
        self.replicated = replicated_parameters(self.optimizers)
        self.weight_penalty = None  # quant.kure_weight / r2_weight (experiment switches, pgolf.quant.penalties)
        if cfg.quant.kure_weight or cfg.quant.r2_weight:
            from pgolf.quant.penalties import build_weight_penalty

            self.weight_penalty = build_weight_penalty(cfg.quant, self.base_model)

    def make_loader(self) -> TrainLoader:
        m = self.cfg.model
        return build_loader(self.cfg.data, self.train_files, self.ctx.rank, self.ctx.world_size, self.device,
                            doc_window=m.doc_attention_window, bos_id=m.bos_id, rope_scaling=m.rope_scaling)

    # --------------------------------------------------------------------------------------------
    def train_step(self, loader: TrainLoader, shape: tuple[int, int] | None = None) -> torch.Tensor:
        """Forward/backward over the micro-batches of one step; returns the mean loss (tensor).
        ``shape``: (global batch tokens, sequence length) of this step (``Curriculum.at``); None =
        train.train_batch_tokens at train.train_seq_len. A weight penalty (quant.kure_weight /
        r2_weight) joins the last micro-batch's loss, so DDP averages its (identical) gradients."""
        cfg = self.cfg
        batch_tokens, seq_len = shape or (cfg.train.train_batch_tokens, cfg.train.train_seq_len)
        total = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            last = micro == self.accum - 1
            if self.ctx.distributed and not self.sharded:
                self.model.require_backward_grad_sync = last
            x, y = loader.next_batch(batch_tokens, seq_len, self.accum)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss = self.model(x, y)
            objective = loss / self.accum
            if last and self.weight_penalty is not None:
                objective = objective + self.weight_penalty()
            objective.backward()
            total += loss.detach()
        if self.sharded and self.ctx.distributed:
            from pgolf.optim.sharded import all_reduce_replicated_grads

            if self.cfg.optim.grad_clip_norm <= 0:
                # Overlap the matrix grads' reduce-scatter with the replicated all-reduce. With
                # clipping on, Muon's step launches it after the clip (it copies the grads at launch).
                self.muon.launch_grad_sync()
            all_reduce_replicated_grads(self.replicated)
        return total / self.accum

    def optimizer_step(self, step: int, scale: float, frac: float = 0.0) -> None:
        o = self.cfg.optim
        momentum = muon_momentum(step, start=o.muon_momentum_warmup_start, end=o.muon_momentum, warmup_steps=o.muon_momentum_warmup_steps)
        wd_mul = muon_wd_multiplier(frac, o.muon_wd_taper_start, o.muon_wd_taper_final)
        for group in self.muon.param_groups:
            group["momentum"] = momentum
            if "base_weight_decay" in group:
                group["weight_decay"] = group["base_weight_decay"] * wd_mul
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def clip_gradients(self) -> torch.Tensor | None:
        """Global grad-norm clip (when on); returns the pre-clip norm for the non-finite check."""
        if self.cfg.optim.grad_clip_norm <= 0:
            return None
        return torch.nn.utils.clip_grad_norm_(self.base_model.parameters(), self.cfg.optim.grad_clip_norm)

    def compile_warmup(self) -> float:
        """Prime the compiled graphs on real batches, then restore model, optimizers and loader."""
        steps = self.cfg.train.warmup_steps
        if not self.compiled or steps <= 0:
            return 0.0
        t0 = time.perf_counter()
        model_state = {k: v.detach().cpu().clone() for k, v in self.base_model.state_dict().items()}
        opt_states = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
        loader = self.make_loader()
        # With layer loops both graphs (loops off, then on) are compiled here, not mid-run.
        phases = [False, True] if self.loops_pending else [self.base_model.looping_active]
        for looping in phases:
            self.base_model.set_looping(looping)
            for i in range(steps):
                self.train_step(loader)
                for opt in self.optimizers:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                self.logger.log(f"warmup_step:{i + 1}/{steps}" + (f" looping:{looping}" if self.loops_pending else ""))
        # Curriculum / batch warm-up: one step on every other (batch, length) shape, so each graph
        # compiles here once rather than inside the training clock (pgolf.train.curriculum).
        for shape in self.curriculum.shapes() if self.curriculum.active else []:
            self.train_step(loader, shape)
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            self.logger.log(f"warmup_shape batch_tokens:{shape[0]} seq_len:{shape[1]}")
        self.base_model.set_looping(phases[0])
        self.base_model.load_state_dict(model_state, strict=True)
        for opt, state in zip(self.optimizers, opt_states):
            opt.load_state_dict(state)
        if self.ctx.distributed and not self.sharded:
            self.model.require_backward_grad_sync = True
        return time.perf_counter() - t0

    def schedule(self, step: int, elapsed_ms: float, cap_ms: float | None) -> tuple[float, float]:
        """(training fraction, LR scale) before this step: the fraction-based warmdown with its
        floor (R3+) when train.warmdown_frac > 0, else the challenge's warmdown_iters rule."""
        t = self.cfg.train
        frac = training_fraction(step, elapsed_ms, iterations=t.iterations, max_wallclock_ms=cap_ms)
        if t.lr_schedule == "d2z":  # linear decay to zero over the whole run (experiment switch)
            return frac, lr_scale_d2z(frac)
        if t.warmdown_frac > 0:
            return frac, lr_scale_frac(frac, t.warmdown_frac, t.min_lr)
        return frac, lr_scale(step, elapsed_ms, iterations=t.iterations, warmdown_iters=t.warmdown_iters, max_wallclock_ms=cap_ms)

    def maybe_enable_loops(self, step: int, frac: float) -> None:
        if self.loops_pending and frac >= self.cfg.model.loop_enable_at:
            self.base_model.set_looping(True)
            self.loops_pending = False
            layers = self.base_model.encoder_layers + self.base_model.decoder_layers + self.base_model.lane_layers
            self.logger.log(f"layer_loop:enabled step:{step} frac:{frac:.3f} virtual_layers:{layers}")
            self.logger.metric("layer_loop", step=step, frac=frac)

    # --------------------------------------------------------------------------------------------
    def validate(self, model_for_eval, progress: bool = True):
        cfg = self.cfg
        was_training = model_for_eval.training
        model_for_eval.eval()
        res = evaluate_standard(
            model_for_eval.token_nll,
            self.val_tokens,
            cfg.eval_seq_len,
            self.lut,
            batch_tokens=cfg.eval.val_batch_tokens,
            device=self.device,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            autocast_dtype=self.amp_dtype,
            progress=progress and cfg.train.progress and self.ctx.is_main,
        )
        model_for_eval.train(was_training)
        return res

    @torch.no_grad()
    def proxy_loss(self, shadow: dict) -> float:
        """Mean NLL of the weights ``shadow`` on the held-out training tokens (``avg.ema_tracks``;
        ``pgolf.data.holdout``: the end of the held-out training shard, never validation tokens).
        Rank 0's value is broadcast so every rank makes the same choice; the live weights are
        restored afterwards."""
        from pgolf.data.holdout import read_holdout_tokens

        cfg, model = self.cfg, self.base_model
        if getattr(self, "_proxy_tokens", None) is None:
            self._proxy_tokens = read_holdout_tokens(self.holdout_file, cfg.avg.proxy_tokens, cfg.data.train_glob, cfg.data.val_glob)
        tokens = self._proxy_tokens
        seq = min(cfg.train.train_seq_len, tokens.numel() - 1)
        n_seq = (tokens.numel() - 1) // seq
        x_all = tokens[: n_seq * seq].reshape(n_seq, seq)
        y_all = tokens[1 : n_seq * seq + 1].reshape(n_seq, seq)
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({k: (shadow[k].to(device=v.device, dtype=v.dtype) if k in shadow else v) for k, v in live.items()}, strict=True)
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        per_batch = max(1, cfg.eval.val_batch_tokens // (seq * self.ctx.world_size)) if cfg.eval.val_batch_tokens else 16
        for i in range(0, n_seq, per_batch):
            x, y = x_all[i : i + per_batch].to(self.device), y_all[i : i + per_batch].to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                total += model.token_nll(x, y).double().sum()
        loss = total / (n_seq * seq)
        if self.ctx.distributed:
            torch.distributed.broadcast(loss, 0)
        model.load_state_dict(live, strict=True)
        model.train(was_training)
        return float(loss)

    def wallclock_cap_ms(self) -> float | None:
        """The training cap; with GPTQ its Hessian time is reserved inside it (field-notes 1.8)."""
        t, q = self.cfg.train, self.cfg.quant
        if t.max_wallclock_seconds <= 0:
            return None
        reserve = (self.gptq_reserve if self.gptq_reserve is not None else max(q.gptq_reserve_seconds, 0.0)) if q.gptq == "full" else 0.0
        return 1000.0 * max(t.max_wallclock_seconds - reserve, 0.0)

    # --------------------------------------------------------------------------------------------
    # checkpoints (see pgolf.train.checkpoint): every rank saves its own optimizer state

    def checkpoint_state(self, loader, progress: dict) -> dict:
        import random

        import numpy as np

        np_state = np.random.get_state()
        avg = self.averager
        return {
            "model": self.base_model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "ema": avg.ema.shadow if avg.ema is not None else None,
            "ema_tracks": [t.shadow for t in avg.tracks],
            "swa": {"sum": avg.swa.sum, "count": avg.swa.count} if avg.swa is not None else None,
            "swa_start_step": avg.swa_start_step,
            "qat_active": self.qat.active if self.qat is not None else None,
            "looping_active": self.base_model.looping_active,
            "loops_pending": self.loops_pending,
            "loader": loader.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                "python": random.getstate(),
            },
            "progress": progress,
        }

    def restore(self, state: dict, loader) -> dict:
        import random

        import numpy as np

        self.base_model.load_state_dict(state["model"], strict=True)
        for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        avg = self.averager
        if avg.ema is not None:
            for k, v in state["ema"].items():
                avg.ema.shadow[k].copy_(v)
        tracks = state.get("ema_tracks", [])
        if len(tracks) != len(avg.tracks):
            raise UserError(f"checkpoint has {len(tracks)} EMA tracks, the config {len(avg.tracks)} (avg.ema_tracks); resume with the config that wrote it")
        for track, shadow in zip(avg.tracks, tracks):
            for k, v in shadow.items():
                track.shadow[k].copy_(v)
        if avg.swa is not None:
            avg.swa.sum = {k: v.clone() for k, v in state["swa"]["sum"].items()}
            avg.swa.count = int(state["swa"]["count"])
        avg.swa_start_step = state["swa_start_step"]
        if self.qat is not None:
            self.qat.set_active(bool(state["qat_active"]))
        self.loops_pending = bool(state["loops_pending"])
        self.base_model.set_looping(bool(state["looping_active"]))
        loader.load_state_dict(state["loader"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        n = rng["numpy"]
        np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
        py = rng["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        return state["progress"]

    def save_checkpoint(self, loader, progress: dict, reason: str) -> None:
        from pgolf.train.checkpoint import mark_complete, step_dir, write_rank_file

        from pgolf.train.checkpoint import CheckpointError

        t0 = time.perf_counter()
        step = int(progress["step"])
        try:
            write_rank_file(self.run_dir, step, self.ctx.rank, self.checkpoint_state(loader, progress))
        except OSError as exc:
            # write_bytes_atomic wrote to a temp name: the previous checkpoints are untouched
            raise CheckpointError(f"{step_dir(self.run_dir, step)}: cannot write the checkpoint ({exc.strerror or exc}); "
                                  "the previous complete checkpoint is intact: free space, then resume") from None
        barrier()
        if self.ctx.is_main:
            mark_complete(self.run_dir, step, self.ctx.world_size, self.config_hash, keep=self.cfg.train.checkpoint_keep)
        barrier()
        self.logger.log(f"checkpoint:saved step:{step} reason:{reason} path:{step_dir(self.run_dir, step)} "
                        f"seconds:{time.perf_counter() - t0:.1f}")
        self.logger.metric("checkpoint", step=step, reason=reason)

    # --------------------------------------------------------------------------------------------
    def stop_flags(self, reached: bool, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> tuple[bool, bool, bool]:
        """(cap reached, stop requested by a signal, non-finite loss or gradient norm), agreed by
        every rank in one collective: ranks that disagreed on stopping would hang."""
        # Built on the device so that the step costs one host sync (the .tolist() below), not one
        # per check: the finite test never leaves the device before the flags are read together.
        bad = ~torch.isfinite(loss.detach().float().reshape(()))
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm.detach().float().reshape(()))
        host = torch.tensor([int(reached), int(self.signals.received is not None)], dtype=torch.int64)
        flags = torch.cat([host.to(self.device, non_blocking=True), bad.to(torch.int64).reshape(1)])
        if self.ctx.distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        r, s, n = (bool(v) for v in flags.tolist())
        return r, s, n

    def loop(self, resume_state: dict | None = None) -> dict:
        cfg, t = self.cfg, self.cfg.train
        cap_ms = self.wallclock_cap_ms()
        loader = self.make_loader()
        self.averager = WeightAverager(cfg.avg, self.base_model)
        progress = {"step": 0, "train_ms": 0.0, "stop_after": None, "last_loss": float("nan"), "tokens": 0}
        if resume_state is not None:
            progress = self.restore(resume_state, loader)
            self.logger.log(f"status:resumed step:{progress['step']} train_time:{progress['train_ms']:.0f}ms "
                            f"(log lines of later steps above this one come from the interrupted attempt)")
            self.logger.metric("status", status="resumed", step=progress["step"])
        if self.qat is not None and self.qat.active:
            self.logger.log(f"qat:always_on linears:{len(self.qat.quantizers)}")
        bar = _train_bar(t, self.ctx.is_main)
        train_ms = float(progress["train_ms"])
        stop_after: int | None = progress["stop_after"]
        step = int(progress["step"])
        last_loss = float(progress["last_loss"])
        tokens = int(progress.get("tokens", step * t.train_batch_tokens))  # tokens trained on so far
        resumed_at = step if resume_state is not None else None
        self.progress = progress
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        while True:
            last = step == t.iterations or (stop_after is not None and step >= stop_after)
            if last or (t.val_loss_every > 0 and step % t.val_loss_every == 0 and step != resumed_at):
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                train_ms += 1000.0 * (time.perf_counter() - t0)
                res = self.validate(self.base_model, progress=False)
                self.logger.log(
                    f"step:{step}/{t.iterations} val_loss:{res.val_loss:.4f} val_bpb:{res.val_bpb:.4f} "
                    f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms"
                )
                self.logger.metric("val", step=step, val_loss=res.val_loss, val_bpb=res.val_bpb, train_time_ms=train_ms)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            if last:
                if stop_after is not None and step < t.iterations:
                    self.logger.log(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{step}/{t.iterations}")
                break
            elapsed_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
            frac, scale = self.schedule(step, elapsed_ms, cap_ms)
            self.maybe_enable_loops(step, frac)
            if self.qat is not None:
                msg = self.qat.update(scale, step)
                if msg:
                    self.logger.log(msg)
            self.step_ref["step"] = step
            shape = self.curriculum.at(step, frac)
            loss = self.train_step(loader, shape)
            grad_norm = self.clip_gradients()
            approx_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
            reached, stop_requested, non_finite = self.stop_flags(cap_ms is not None and approx_ms >= cap_ms, loss, grad_norm)
            if non_finite or stop_requested:
                # The step is not taken: the saved state is the last good one, and a resumed run
                # recomputes this step from it exactly.
                for opt in self.optimizers:
                    opt.zero_grad(set_to_none=True)
                train_ms += 1000.0 * (time.perf_counter() - t0)
                state = {"step": step, "train_ms": train_ms, "stop_after": stop_after, "last_loss": last_loss, "tokens": tokens}
                self.save_checkpoint(loader, state, "non_finite" if non_finite else "signal")
                if bar is not None:
                    bar.close()
                if non_finite:
                    raise TrainingDivergedError(
                        f"training diverged at step {step + 1}: the loss or gradient norm is not finite "
                        f"(loss {loss.item():.4g}); the last good state is checkpointed at step {step}. "
                        "Lower the learning rates or enable optim.grad_clip_norm, then resume or restart")
                raise RunInterrupted(step, self.signals.received)
            self.optimizer_step(step, scale, frac)
            step += 1
            tokens += shape[0]
            msg = self.averager.after_step(self.base_model, step, scale)
            if msg:
                self.logger.log(msg)
            log_now = t.train_log_every > 0 and (step <= 10 or step % t.train_log_every == 0 or stop_after is not None)
            if log_now and self.ctx.distributed:
                # Logged losses are the mean over all ranks' micro-batches (the whole global batch),
                # so a 1-process and an N-process run of the same batch log the same number.
                torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.SUM)  # gloo has no AVG
                loss = loss / self.ctx.world_size
            if log_now or bar is not None:
                last_loss = loss.item()
            if log_now:
                self.logger.log(
                    f"step:{step}/{t.iterations} train_loss:{last_loss:.4f} train_time:{approx_ms:.0f}ms step_avg:{approx_ms / step:.2f}ms"
                )
                self.logger.metric("train", step=step, train_loss=last_loss, lr_scale=scale, train_time_ms=approx_ms, tokens=tokens, seq_len=shape[1])
            if bar is not None:
                _advance_bar(bar, t, step, approx_ms, last_loss)
            if reached and stop_after is None:
                stop_after = step
            if t.checkpoint_every > 0 and step % t.checkpoint_every == 0 and step < t.iterations:
                train_ms += 1000.0 * (time.perf_counter() - t0)  # saving does not count as training time
                self.save_checkpoint(loader, {"step": step, "train_ms": train_ms, "stop_after": stop_after, "last_loss": last_loss, "tokens": tokens}, "periodic")
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
        if bar is not None:
            bar.close()
        if self.loops_pending:
            self.logger.log(f"layer_loop:never_enabled step:{step} (the run stopped before loop_enable_at={self.cfg.model.loop_enable_at})")
        # Evaluation, export and every later use of the weights run with the loops on.
        self.base_model.set_looping(self.cfg.model.num_loops > 0)
        self.loops_pending = False
        return {"steps": step, "train_seconds": train_ms / 1000.0, "final_train_loss": last_loss, "tokens": tokens}


class RunInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run at a step boundary after a checkpoint (not a user error)."""

    def __init__(self, step: int, signum: int | None = None):
        super().__init__(f"interrupted at step {step}")
        self.step, self.signum = step, signum


class TrainingDivergedError(UserError):
    """A non-finite loss or gradient norm; the last good state was checkpointed."""


def _train_bar(t, enabled: bool):
    if not (enabled and t.progress):
        return None
    from tqdm.auto import tqdm

    if t.max_wallclock_seconds > 0:
        return tqdm(total=round(t.max_wallclock_seconds, 1), desc="train", unit="s", dynamic_ncols=True, leave=False, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s {postfix}", disable=None)
    return tqdm(total=t.iterations, desc="train", unit="step", dynamic_ncols=True, leave=False, disable=None)


def _advance_bar(bar, t, step: int, approx_ms: float, loss: float) -> None:
    if t.max_wallclock_seconds > 0:
        bar.n = min(approx_ms / 1000.0, bar.total)
    else:
        bar.n = step
    bar.set_postfix_str(f"step {step} loss {loss:.3f}", refresh=False)
    bar.refresh()
