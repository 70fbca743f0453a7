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
    """Score-first test-time training (legal: every token is scored before the model adapts on it)."""

    mode: str = "off"  # off | sgd (full parameters) | lora
    chunk_tokens: int = 32_768
    epochs: int = 3
    lr: float = 0.002
    momentum: float = 0.9
    grad_clip: float = 1.0
    batch_seqs: int = 32
    seq_len: int = 0  # 0 = eval seq len
    lora_rank: int = 8
    lora_targets: list[str] = field(default_factory=lambda: ["c_q", "c_v"])

    def validate(self) -> None:
        from pgolf.errors import ConfigError

        if self.mode not in ("off", "sgd", "lora"):
            raise ConfigError(f"ttt.mode: must be off, sgd or lora, got {self.mode!r}")
        if self.chunk_tokens < 1 or self.epochs < 0 or self.batch_seqs < 1:
            raise ConfigError("ttt.chunk_tokens and ttt.batch_seqs must be >= 1, ttt.epochs >= 0")
