"""Optimizer configuration: learning rates, Muon/NorMuon, Adam(W) and weight decay.

Defaults are the challenge baseline: Muon at 0.04 (momentum 0.95, warm-up from 0.85 over 500
steps, 5 Newton-Schulz steps), Adam at 0.05 for the tied embedding and 0.04 for scalars, no weight
decay, no gradient clipping. The later records' Muon options (MuonEq-R, Polar-Express NS, the
sharded layout with bf16 momentum, per-group Adam WD, the Muon WD taper) all default to off.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class OptimConfig:
    matrix_optimizer: str = "muon"  # muon | normuon
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    tied_embed_lr: float = 0.05  # token group (tok_emb, bigram/VE tables) when embeddings are tied
    embed_lr: float = 0.6  # token group when embeddings are untied
    head_lr: float = 0.008  # untied lm_head
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5
    muon_nesterov: bool = True
    muon_wd: float = 0.0  # decoupled: p *= 1 - lr * wd, with the scheduled lr
    muon_row_normalize: bool = False  # MuonEq-R (R4+): each row of the update / its L2 norm before NS
    muon_ns: str = "standard"  # standard (fixed quintic) | polar_express (R6+; at most 5 steps run)
    # round_robin: DDP grads, parameter i on rank i mod world; sharded (R1, R6/R7): no DDP, each
    # same-shape bank reduce-scattered / orthogonalised per shard / all-gathered (optim/sharded.py)
    muon_layout: str = "round_robin"
    muon_momentum_dtype: str = "fp32"  # fp32 | bf16 (R6/R7 keep the momentum buffer in bf16)
    # Muon WD multiplier: 1 up to this training fraction, then linear to _final at the end (PR #1729
    # record: 0.70 -> 0.5); start >= 1 or final == 1 is off
    muon_wd_taper_start: float = 1.0
    muon_wd_taper_final: float = 1.0
    normuon_beta2: float = 0.95
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    adam_wd: float = 0.0  # > 0 switches the Adam groups to AdamW (decoupled decay)
    embed_wd: float = -1.0  # token-group AdamW WD (R3+: 0.085); -1 = adam_wd
    scalar_wd: float = -1.0  # scalar-group AdamW WD (R3+: 0.02); -1 = adam_wd
    grad_clip_norm: float = 0.0  # global L2 norm over all parameters; 0 = off
    # Experiment switch (issue 16): the matrix LR of the blocks that run only in the U-Net decoder
    # half (ModelConfig.decoder_only_blocks) is matrix_lr * decoder_lr_mult; 1 = off.
    decoder_lr_mult: float = 1.0

    def validate(self) -> None:
        from pgolf.errors import ConfigError

        if self.matrix_optimizer not in ("muon", "normuon"):
            raise ConfigError(f"optim.matrix_optimizer: must be muon or normuon, got {self.matrix_optimizer!r}")
        for key in ("matrix_lr", "scalar_lr", "tied_embed_lr", "embed_lr", "head_lr", "muon_wd", "adam_wd"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key}: must be >= 0, got {getattr(self, key)}")
        if not self.decoder_lr_mult > 0:
            raise ConfigError(f"optim.decoder_lr_mult: must be > 0 (1 = off), got {self.decoder_lr_mult}")
        if self.muon_backend_steps < 1:
            raise ConfigError(f"optim.muon_backend_steps: must be >= 1, got {self.muon_backend_steps}")
        for key in ("embed_wd", "scalar_wd"):
            if getattr(self, key) < 0 and getattr(self, key) != -1.0:
                raise ConfigError(f"optim.{key}: must be >= 0, or -1 to use optim.adam_wd, got {getattr(self, key)}")
        for key, allowed in (
            ("muon_ns", ("standard", "polar_express")),
            ("muon_layout", ("round_robin", "sharded")),
            ("muon_momentum_dtype", ("fp32", "bf16")),
        ):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"optim.{key}: must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.muon_wd_taper_start < 0:
            raise ConfigError(f"optim.muon_wd_taper_start: must be >= 0 (>= 1 = no taper), got {self.muon_wd_taper_start}")
        if self.muon_wd_taper_final < 0:
            raise ConfigError(f"optim.muon_wd_taper_final: must be >= 0 (1 = no taper), got {self.muon_wd_taper_final}")
        if self.matrix_optimizer == "normuon":
            for key, default in (("muon_row_normalize", False), ("muon_ns", "standard"), ("muon_layout", "round_robin"),
                                 ("muon_momentum_dtype", "fp32")):
                if getattr(self, key) != default:
                    raise ConfigError(f"optim.{key}: must stay {default!r} with optim.matrix_optimizer=normuon (Muon only)")

    def group_wd(self, key: str) -> float:
        """The AdamW weight decay of ``embed_wd`` / ``scalar_wd``: its value, or adam_wd for -1."""
        value = getattr(self, key)
        return self.adam_wd if value == -1.0 else value
