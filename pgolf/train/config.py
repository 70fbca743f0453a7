"""Training-loop and weight-averaging configuration.

Defaults are the challenge baseline's loop: 524,288 tokens per step at seq 1024, a 600 s
wallclock cap with a wallclock-based linear warmdown, 20 compile warm-up steps whose effect is
rolled back, grad accumulation so that one GPU reproduces the 8-GPU batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class TrainConfig:
    seed: int = 1337
    iterations: int = 20000
    train_batch_tokens: int = 524_288  # global tokens per optimizer step
    train_seq_len: int = 1024
    grad_accum_base: int = 8  # grad_accum_steps = grad_accum_base // world_size
    max_wallclock_seconds: float = 600.0  # <= 0: iteration-based warmdown, no cap
    warmdown_iters: int = 1200
    # > 0: the R3+ fraction-based warmdown instead of warmdown_iters: with f = the training
    # fraction (elapsed / cap, or step / iterations without a cap), the LR scale is 1 until
    # f = 1 - warmdown_frac, then falls linearly to 0 at f = 1, floored at min_lr (R6/R7: 0.10).
    warmdown_frac: float = 0.0
    min_lr: float = 0.0
    warmup_steps: int = 20  # compile/priming steps, rolled back afterwards; skipped when compile is off
    val_loss_every: int = 0  # 0 = validate only at the end
    train_log_every: int = 200
    compile: str = "auto"  # auto (on for CUDA) | on | off
    autocast: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else off) | bf16 | off
    embed_dtype: str = "auto"  # auto (bf16 on CUDA as in the scripts, fp32 on CPU) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 = torch default
    progress: bool = True  # tqdm bar on rank 0
    save_raw: bool = True  # also write the unquantised weights (final_model.raw.pgolf) for re-exports
    # Checkpoints for --resume: every N optimizer steps (0 = only when SIGINT/SIGTERM or a
    # non-finite loss stops the run), keeping the newest checkpoint_keep complete ones.
    checkpoint_every: int = 0
    checkpoint_keep: int = 2
    collective_timeout_seconds: float = 600.0  # a rank that dies or hangs ends the others after this
    # --- experiment switches (issue 16; off in every preset) ------------------------------------
    # wallclock_warmdown: the warmdown rules above (warmdown_frac, else warmdown_iters); d2z: the
    # LR scale decays linearly from 1 to 0 over the whole run, 1 - f (f = the training fraction),
    # and the warmdown keys are ignored.
    lr_schedule: str = "wallclock_warmdown"
    # "LEN:FRAC,...": sequence length LEN from training fraction FRAC on (pgolf.train.curriculum);
    # the last LEN must be train_seq_len; "" = off (train_seq_len throughout).
    seq_len_schedule: str = ""
    # Batch warm-up: the global batch ramps linearly from batch_warmup_tokens to train_batch_tokens
    # over batch_warmup_steps steps, in multiples of train_batch_tokens / 8; 0 = off.
    batch_warmup_tokens: int = 0
    batch_warmup_steps: int = 0
    # The step count the step-based schedules (warmdown_iters, momentum warm-up, SWA cadence) were
    # scaled for (a profile's [scale]); a run that stops below half of it warns. 0 = not stated.
    schedule_steps: int = 0

    def validate(self) -> None:
        from pgolf.errors import ConfigError

        for key in ("iterations", "train_batch_tokens", "train_seq_len", "grad_accum_base"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if self.schedule_steps < 0:
            raise ConfigError(f"train.schedule_steps: must be >= 0 (0 = not stated), got {self.schedule_steps}")
        if self.checkpoint_every < 0 or self.checkpoint_keep < 1:
            raise ConfigError("train.checkpoint_every must be >= 0 (0 = on stop only) and train.checkpoint_keep >= 1")
        if self.collective_timeout_seconds <= 0:
            raise ConfigError(f"train.collective_timeout_seconds: must be > 0, got {self.collective_timeout_seconds}")
        if not 0.0 <= self.warmdown_frac <= 1.0:
            raise ConfigError(f"train.warmdown_frac: must be in [0, 1] (0 = use warmdown_iters), got {self.warmdown_frac}")
        if not 0.0 <= self.min_lr <= 1.0:
            raise ConfigError(f"train.min_lr: must be in [0, 1] (a floor on the LR multiplier), got {self.min_lr}")
        if self.lr_schedule not in ("wallclock_warmdown", "d2z"):
            raise ConfigError(f"train.lr_schedule: must be wallclock_warmdown or d2z, got {self.lr_schedule!r}")
        if self.seq_len_schedule:
            from pgolf.train.curriculum import parse_seq_len_schedule

            stages = parse_seq_len_schedule(self.seq_len_schedule)
            if stages[-1][1] != self.train_seq_len:
                raise ConfigError(f"train.seq_len_schedule: the last length must be train.train_seq_len={self.train_seq_len}, got {stages[-1][1]}")
        if self.batch_warmup_tokens < 0 or self.batch_warmup_steps < 0:
            raise ConfigError("train.batch_warmup_tokens and train.batch_warmup_steps must be >= 0 (0 = off)")
        if (self.batch_warmup_tokens > 0) != (self.batch_warmup_steps > 0):
            raise ConfigError("train.batch_warmup_tokens and train.batch_warmup_steps go together: set both (> 0) or both to 0")
        if self.batch_warmup_tokens > self.train_batch_tokens:
            raise ConfigError(f"train.batch_warmup_tokens: must be <= train.train_batch_tokens={self.train_batch_tokens}, got {self.batch_warmup_tokens}")
        for key, allowed in (
            ("compile", ("auto", "on", "off")),
            ("autocast", ("auto", "bf16", "off")),
            ("embed_dtype", ("auto", "bf16", "fp32")),
            ("device", ("auto", "cpu", "cuda")),
        ):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"train.{key}: must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")


@dataclass(kw_only=True)
class AveragingConfig:
    """Weight averaging. ``export`` picks which weights are quantised and shipped.

    * ``raw``: the live weights at the last step.
    * ``ema``: an fp32 shadow updated after every optimizer step (PR #201's "LAWA-EMA").
    * ``swa``: the uniform mean of snapshots taken every ``swa_every`` steps once the LR scale
      is below ``swa_start_scale``; ``swa_source`` says whether a snapshot is of the raw weights
      (PR #89) or of the EMA (PR #401's "tight SWA"). With fewer than two snapshots the export
      falls back to the source weights, as the submissions do.
    """

    ema_decay: float = 0.0  # 0 = no EMA
    swa_every: int = 0  # 0 = no SWA
    swa_start_scale: float = 0.5
    swa_source: str = "raw"  # raw | ema
    export: str = "raw"  # raw | ema | swa
    # Experiment switch (issue 16): parallel EMA tracks, one independent EMA per decay (empty = off).
    # With avg.export=ema the export is the candidate (each track, and the main EMA when
    # ema_decay > 0) with the lowest loss on ``proxy_tokens`` held-out TRAINING tokens: the last
    # training shard is held out of the loader and the proxy reads the end of it (pgolf.data.holdout);
    # validation tokens are never read. A profile's [scale] "avg.ema_decay" scales each track's
    # horizon the same way (pgolf.config.scale_value).
    ema_tracks: list[float] = field(default_factory=list)
    proxy_tokens: int = 65536

    def validate(self) -> None:
        from pgolf.errors import ConfigError

        for d in self.ema_tracks:
            if not 0.0 < d < 1.0:
                raise ConfigError(f"avg.ema_tracks: every decay must be in (0, 1), got {d}; e.g. avg.ema_tracks=[0.995,0.999]")
        if len(set(self.ema_tracks)) != len(self.ema_tracks):
            raise ConfigError(f"avg.ema_tracks: decays must differ, got {self.ema_tracks}")
        if self.ema_tracks and self.export != "ema":
            raise ConfigError(f"avg.ema_tracks: the proxy picks the exported EMA, so it needs avg.export=ema (got {self.export}); set avg.export=ema or avg.ema_tracks=[]")
        if self.proxy_tokens < 1:
            raise ConfigError(f"avg.proxy_tokens: must be >= 1, got {self.proxy_tokens}")

        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"avg.ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.swa_source not in ("raw", "ema"):
            raise ConfigError(f"avg.swa_source: must be raw or ema, got {self.swa_source!r}")
        if self.export not in ("raw", "ema", "swa"):
            raise ConfigError(f"avg.export: must be raw, ema or swa, got {self.export!r}")
        if self.export == "ema" and self.ema_decay == 0 and not self.ema_tracks:
            raise ConfigError("avg.export=ema needs avg.ema_decay > 0 (or avg.ema_tracks)")
        if self.export == "swa" and self.swa_every <= 0:
            raise ConfigError("avg.export=swa needs avg.swa_every > 0")
        if self.swa_source == "ema" and self.swa_every > 0 and self.ema_decay == 0:
            raise ConfigError("avg.swa_source=ema needs avg.ema_decay > 0")
