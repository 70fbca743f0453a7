"""Evaluation configuration: the standard (non-overlapping) pass, the sliding window and
score-first test-time training.

The validation stream is every ``fineweb_val_*.bin`` shard concatenated, cut to
``((N - 1) // L) * L + 1`` tokens with L = max(train_seq_len, eval_seq_len), exactly as the
challenge scripts do, so that the number of scored targets is the same for every eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class EvalConfig:
    eval_seq_len: int = 0  # 0 = train_seq_len
    val_batch_tokens: int = 524_288  # tokens per standard-eval batch, over all ranks
    sliding_stride: int = 0  # 0 = no sliding-window eval; 64 in the records
    sliding_batch_windows: int = 32  # windows per forward on each rank
    max_val_tokens: int = 0  # 0 = the whole validation split; > 0 truncates it (smoke tests only)

    def validate(self) -> None:
        from pgolf.errors import ConfigError

        if self.eval_seq_len < 0:
            raise ConfigError(f"eval.eval_seq_len: must be >= 0, got {self.eval_seq_len}")
        if self.sliding_stride < 0:
            raise ConfigError(f"eval.sliding_stride: must be >= 0, got {self.sliding_stride}")
        if self.val_batch_tokens < 1 or self.sliding_batch_windows < 1:
            raise ConfigError("eval.val_batch_tokens and eval.sliding_batch_windows must be >= 1")


@dataclass(kw_only=True)
class TTTConfig:
    """Score-first test-time training (legal: every token is scored before the model adapts on it).

    Defaults are the recorded recipe (PR #461, the 2026-03-23 record): chunks of 32,768 targets,
    3 epochs per chunk, SGD momentum 0.9, lr 0.002 with cosine decay across chunks, clip 1.0,
    32 sequences per step. ``lora`` trains rank-``lora_rank`` adapters on ``lora_targets`` only
    (scale ``lora_alpha / lora_rank``) with the same optimizer and schedule at ``lora_lr``.
    """

    mode: str = "off"  # off | sgd (full parameters) | lora
    chunk_tokens: int = 32_768
    epochs: int = 3
    lr: float = 0.002  # sgd mode
    momentum: float = 0.9
    grad_clip: float = 1.0  # global grad-norm clip; 0 = off
    batch_seqs: int = 32  # sequences per optimizer step, over all ranks
    seq_len: int = 0  # 0 = eval seq len
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_lr: float = 0.5  # lora mode; best of 0.01 / 0.1 / 0.5 on a pr401-cpu model (gains stay small)
    lora_targets: list[str] = field(default_factory=lambda: ["c_q", "c_v"])

    @property
    def effective_lr(self) -> float:
        return self.lora_lr if self.mode == "lora" else self.lr

    def validate(self) -> None:
        from pgolf.errors import ConfigError

        if self.mode not in ("off", "sgd", "lora"):
            raise ConfigError(f"ttt.mode: must be off, sgd or lora, got {self.mode!r}")
        if self.chunk_tokens < 1 or self.epochs < 0 or self.batch_seqs < 1:
            raise ConfigError("ttt.chunk_tokens and ttt.batch_seqs must be >= 1, ttt.epochs >= 0")
        if self.lr < 0 or self.lora_lr < 0 or self.grad_clip < 0 or not 0 <= self.momentum < 1:
            raise ConfigError("ttt.lr, ttt.lora_lr and ttt.grad_clip must be >= 0 and ttt.momentum in [0, 1)")
        if self.seq_len < 0:
            raise ConfigError(f"ttt.seq_len: must be >= 0 (0 = the eval seq len), got {self.seq_len}")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ConfigError("ttt.lora_rank must be >= 1 and ttt.lora_alpha > 0")
        if self.mode == "lora" and not self.lora_targets:
            raise ConfigError("ttt.lora_targets: name at least one linear layer (e.g. c_q,c_v) for ttt.mode=lora")
