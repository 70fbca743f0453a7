"""Evaluation configuration: the standard (non-overlapping) pass, the sliding window and
score-first test-time training.

The validation stream is every ``fineweb_val_*.bin`` shard concatenated, cut to
``((N - 1) // L) * L + 1`` tokens with L = max(train_seq_len, eval_seq_len), exactly as the
challenge scripts do, so that the number of scored targets is the same for every eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Adapter targets of the phased protocol, per virtual layer slot: q, k, v (the attention's
# c_q/c_k/c_v), o (d -> d on the attention input, added to the attention output), mlp (d -> d on
# the MLP input, added to its output); plus head (d -> vocab, added to the logits before the softcap).
PHASED_TARGETS = ("q", "k", "v", "o", "mlp", "head")


@dataclass(kw_only=True)
class EvalConfig:
    eval_seq_len: int = 0  # 0 = train_seq_len
    val_batch_tokens: int = 524_288  # tokens per standard-eval batch, over all ranks
    sliding_stride: int = 0  # 0 = no sliding-window eval; 64 in the records
    sliding_batch_windows: int = 32  # windows per forward on each rank
    max_val_tokens: int = 0  # 0 = the whole validation split; > 0 scores a labelled prefix (a comparison, not a score)
    diagnostic: bool = True  # the pre-quantisation eval of the exported weights (DIAGNOSTIC post_avg, val_bpb_prequant)
    # Experiment switch (issue 16): score softmax(logits / T) in every evaluation (standard, sliding,
    # TTT scoring and TTT's own loss): GPT.set_eval_temperature; 1 = off (bit-identical).
    temperature: float = 1.0

    def validate(self) -> None:
        from pgolf.errors import ConfigError

        if self.eval_seq_len < 0:
            raise ConfigError(f"eval.eval_seq_len: must be >= 0, got {self.eval_seq_len}")
        if self.sliding_stride < 0:
            raise ConfigError(f"eval.sliding_stride: must be >= 0, got {self.sliding_stride}")
        if self.val_batch_tokens < 1 or self.sliding_batch_windows < 1:
            raise ConfigError("eval.val_batch_tokens and eval.sliding_batch_windows must be >= 1")
        if not self.temperature > 0:
            raise ConfigError(f"eval.temperature: must be > 0 (1 = off), got {self.temperature}")


@dataclass(kw_only=True)
class TTTConfig:
    """Score-first test-time training (legal: every token is scored before the model adapts on it).

    Defaults are the recorded recipe (PR #461, the 2026-03-23 record): chunks of 32,768 targets,
    3 epochs per chunk, SGD momentum 0.9, lr 0.002 with cosine decay across chunks, clip 1.0,
    32 sequences per step. ``lora`` trains rank-``lora_rank`` adapters on ``lora_targets`` only
    (scale ``lora_alpha / lora_rank``) with the same optimizer and schedule at ``lora_lr``.

    ``phased`` is the protocol of R6/R7 (frontier.md 3.18, ``pgolf.eval.phased``): documents in
    length-sorted batches of ``batch_docs``, one LoRA per document (``doc_lora_*``, AdamW with
    betas (0, ``doc_beta2``)) trained on each ``doc_chunk``-token chunk after scoring it, and at
    the ``phases`` boundaries floor(prefix_docs (k+1) / phases) one pass of SGD on the base model
    over the documents already scored (``global_lr``, ``global_epochs``, and the score-first keys
    ``chunk_tokens``, ``momentum``, ``grad_clip``, ``batch_seqs``, ``seq_len``). Defaults are R7's.
    """

    mode: str = "off"  # off | sgd (full parameters) | lora | phased (R6/R7)
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
    # --- phased (R6/R7): per-document batched LoRA + global SGD phases --------------------------
    batch_docs: int = 64  # documents per batch (TTT_BATCH_SIZE)
    doc_chunk: int = 48  # predicted tokens per LoRA chunk (TTT_CHUNK_SIZE)
    grad_steps: int = 1  # LoRA optimizer steps per chunk (TTT_GRAD_STEPS)
    doc_lora_rank: int = 80  # R7 80, R6 96
    doc_lora_alpha: float = 144.0  # scale alpha / rank
    doc_lora_lr: float = 1e-4
    doc_lora_targets: list[str] = field(default_factory=lambda: list(PHASED_TARGETS))
    doc_beta2: float = 0.99  # AdamW betas (0, beta2): R7 0.99, R6 0.999
    doc_weight_decay: float = 0.5  # R7 0.5, R6 (scored) 1.0
    doc_eps: float = 1e-10
    warm_start_a: bool = True  # keep A across a rank's batches within a phase (B is reset per batch)
    prefix_docs: int = 2500  # R7 2500, R6 2000
    phases: int = 3  # global SGD phases at floor(prefix_docs * (k + 1) / phases)
    global_lr: float = 0.001  # cosine over the chunks of chunk_tokens, the last chunk skipped
    global_epochs: int = 1
    # Experiment switch (issue 16): SAM during TTT's SGD steps (sgd, lora and phased's global SGD):
    # the gradient of each step is taken at w + sam_rho * g / ||g||; 0 = off.
    sam_rho: float = 0.0

    @property
    def effective_lr(self) -> float:
        return self.lora_lr if self.mode == "lora" else self.lr

    def validate(self) -> None:
        from pgolf.errors import ConfigError

        if self.mode not in ("off", "sgd", "lora", "phased"):
            raise ConfigError(f"ttt.mode: must be off, sgd, lora or phased, got {self.mode!r}")
        if self.chunk_tokens < 1 or self.epochs < 0 or self.batch_seqs < 1:
            raise ConfigError("ttt.chunk_tokens and ttt.batch_seqs must be >= 1, ttt.epochs >= 0")
        if self.lr < 0 or self.lora_lr < 0 or self.grad_clip < 0 or not 0 <= self.momentum < 1:
            raise ConfigError("ttt.lr, ttt.lora_lr and ttt.grad_clip must be >= 0 and ttt.momentum in [0, 1)")
        if self.seq_len < 0:
            raise ConfigError(f"ttt.seq_len: must be >= 0 (0 = the eval seq len), got {self.seq_len}")
        if self.sam_rho < 0:
            raise ConfigError(f"ttt.sam_rho: must be >= 0 (0 = off), got {self.sam_rho}")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ConfigError("ttt.lora_rank must be >= 1 and ttt.lora_alpha > 0")
        if self.mode == "lora" and not self.lora_targets:
            raise ConfigError("ttt.lora_targets: name at least one linear layer (e.g. c_q,c_v) for ttt.mode=lora")
        for key in ("batch_docs", "doc_chunk", "grad_steps", "doc_lora_rank", "global_epochs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"ttt.{key}: must be >= 1, got {getattr(self, key)}")
        if self.prefix_docs < 0 or self.phases < 0:
            raise ConfigError(f"ttt.prefix_docs and ttt.phases must be >= 0 (0 = no global SGD), got {self.prefix_docs}, {self.phases}")
        if self.doc_lora_alpha <= 0 or self.doc_lora_lr < 0 or self.global_lr < 0 or self.doc_weight_decay < 0:
            raise ConfigError("ttt.doc_lora_alpha must be > 0; ttt.doc_lora_lr, ttt.global_lr and ttt.doc_weight_decay >= 0")
        if not 0 <= self.doc_beta2 < 1 or self.doc_eps <= 0:
            raise ConfigError(f"ttt.doc_beta2 must be in [0, 1) and ttt.doc_eps > 0, got {self.doc_beta2}, {self.doc_eps}")
        bad = [t for t in self.doc_lora_targets if t not in PHASED_TARGETS]
        if bad or (self.mode == "phased" and not self.doc_lora_targets):
            raise ConfigError(f"ttt.doc_lora_targets: {bad or 'empty'}; choose from {', '.join(PHASED_TARGETS)}")
