"""Optimizer configuration: learning rates, Muon/NorMuon, Adam(W) and weight decay.

Defaults are the challenge baseline: Muon at 0.04 (momentum 0.95, warm-up from 0.85 over 500
steps, 5 Newton-Schulz steps), Adam at 0.05 for the tied embedding and 0.04 for scalars, no weight
decay, no gradient clipping.
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
    normuon_beta2: float = 0.95
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    adam_wd: float = 0.0  # > 0 switches the Adam groups to AdamW (decoupled decay)
    grad_clip_norm: float = 0.0  # global L2 norm over all parameters; 0 = off

    def validate(self) -> None:
        from pgolf.errors import ConfigError

        if self.matrix_optimizer not in ("muon", "normuon"):
            raise ConfigError(f"optim.matrix_optimizer: must be muon or normuon, got {self.matrix_optimizer!r}")
        for key in ("matrix_lr", "scalar_lr", "tied_embed_lr", "embed_lr", "head_lr", "muon_wd", "adam_wd"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key}: must be >= 0, got {getattr(self, key)}")
        if self.muon_backend_steps < 1:
            raise ConfigError(f"optim.muon_backend_steps: must be >= 1, got {self.muon_backend_steps}")
