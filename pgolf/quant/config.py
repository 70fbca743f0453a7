"""Export (quantisation + compression) configuration.

Each state-dict tensor gets exactly one storage *format*, chosen in this order:

1. the first ``name_formats`` entry whose pattern occurs in the name (``"pattern=format"``);
2. non-float tensors: stored as they are;
3. control tensors (``control_patterns``): ``control_format`` (fp32 keeps them exact; PR #201/#401
   meant fp32 but stored fp16 because of an ordering bug);
4. ``tok_emb`` / ``lm_head``: ``embed_format``;
5. tensors with at most ``small_numel`` elements: ``small_format``;
6. by category: ``.mlp.`` -> ``mlp_format``; ``.attn.`` or ``.proj.`` -> ``attn_format``;
   anything else (bigram / value-embedding tables) -> ``other_format``.

A format is ``fp32``, ``fp16``, ``bf16`` or ``int<N>[:<clip>][:<grid>][:<rounding>]`` with N in
2..8, clip ``q`` (per-row 0.9999984 quantile, the submissions' "percentile" clip), ``max`` (row
max) or ``search`` (per-row clip search, "GPTQ-lite" done per row as the record claimed), grid
``sym`` ([-(2^(N-1)-1), 2^(N-1)-1]) or ``full`` ([-2^(N-1), 2^(N-1)-1], PR #201/#401's int6), and
rounding ``stored`` (default: values divided by the stored fp16 scale, the nearest grid point) or
``fp32div`` (divided by the fp32 scale before it is rounded for storage: the baseline's int8,
PR #89's int6 and #201/#401's int8 quantisers; the presets set it there). The rounding rule is
per format because #201/#401 mix both (int6 ``stored``, int8 ``fp32div``); QAT follows it, GPTQ
always rounds against the stored scale (``pgolf.quant.gptq``).
Defaults reproduce the challenge baseline's formats (its rounding needs ``:fp32div``, set by the
baseline preset): int8 per-row with the quantile clip, fp16 passthrough of small tensors, fp32
control tensors, zlib level 9; the integers are stored with ``packing=auto`` (bit-packed or
range-coded, whichever is smaller).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pgolf.model.config import CONTROL_TENSOR_PATTERNS


@dataclass(kw_only=True)
class QuantConfig:
    embed_format: str = "int8:q:sym"
    attn_format: str = "int8:q:sym"
    mlp_format: str = "int8:q:sym"
    other_format: str = "int8:q:sym"
    small_format: str = "fp16"
    control_format: str = "fp32"
    small_numel: int = 65_536
    control_patterns: list[str] = field(default_factory=lambda: list(CONTROL_TENSOR_PATTERNS))
    name_formats: list[str] = field(default_factory=list)  # "pattern=format", first match wins
    clip_quantile: float = 0.9999984
    scale_floor: float = -1.0  # -1: 1/qmax, the submissions' floor; 0: none (1e-12 guard)
    scale_dtype: str = "fp16"
    # Storage of the integer values: int8 (one per byte, as the submissions; kept for comparisons),
    # bitpack (N bits each), entropy (range-coded, row/column-group statistics, see entropy.py), ctx
    # (range-coded, adaptive contexts of the previous row in a stored row order, see ctxcoder.py), or
    # auto (the smallest per tensor, after the codec; recorded in the artifact).
    packing: str = "auto"
    # Byte-level compressor: zlib-9 (baseline), zstd-22 (records; required, never a fallback),
    # lzma, brotli, none, or auto (smallest per tensor, recorded in the artifact). A fixed codec
    # compresses all non-entropy-coded bytes as one stream (as the submissions did); auto gives
    # every large stream its own best codec and needs every codec library installed.
    codec: str = "zlib-9"
    # Quantisation-aware training: off | always (PR #89) | late (switch on when LR scale < threshold).
    qat: str = "off"
    qat_threshold: float = 0.15
    # Experiment switches (issue 16): KURE kurtosis and R2 per-row range penalties on the block
    # matrices, added to the training loss with these weights (pgolf.quant.penalties); 0 = off.
    kure_weight: float = 0.0
    r2_weight: float = 0.0
    # Experiment switch (issue 16): none | hadamard. hadamard quantises every 2-D integer-format
    # matrix as W Q (Q = random signs x block-diagonal Hadamard over its input dimension, seeded by
    # rotate_seed) and undoes it at load (pgolf.quant.rotate); the seed is stored in the artifact.
    rotate: str = "none"
    rotate_seed: int = 0
    # off | greedy: store every MLP's hidden units in the greedy L1 nearest-neighbour order of its
    # fc rows (fc rows and proj columns permuted together: the same model, nothing stored; see
    # pgolf.quant.hidden_order). R7 reorders rows for its compressor and stores the permutations.
    hidden_order: str = "off"
    # GPTQ: off | full (Hessian from calibration activations, Cholesky error feedback).
    gptq: str = "off"
    gptq_calib_source: str = "train"  # train | self (self-generated sequences); never validation
    gptq_calib_seqs: int = 64
    gptq_calib_seq_len: int = 0  # 0: train.train_seq_len
    gptq_temperature: float = 0.8  # sampling temperature of self-generated calibration text
    gptq_block_size: int = 128
    gptq_damp: float = 0.01  # times mean(diag H), added to the diagonal
    gptq_act_order: bool = True  # columns in order of decreasing diag(H) (the records' reordering)
    # Seconds taken off the training wallclock cap when gptq=full, so that training + Hessians stay
    # inside the cap (the records' GPTQ_RESERVE_SECONDS; calibration reads training data). Checked
    # at run start against the measured collection (pgolf.quant.reserve); -1 = auto (measured + 20%).
    gptq_reserve_seconds: float = 10.0
    # Calibration size in the records' unit: batches of one rank's micro-batch
    # (train_batch_tokens / train.grad_accum_base tokens: 48 x 2048 on 8xH100); 0 = gptq_calib_seqs.
    gptq_calib_batches: int = 0
    # GPTQ of the tied embedding (or untied lm_head) with the Hessian of the final norm's output,
    # the input of the LM head (R4+); off: the embedding is rounded to nearest (R3).
    gptq_embed: bool = False
    # SDClip (R4+, format clip rule ``sd``): clip = k * std(row), scale = max(k * std / qmax, 1e-10).
    # k by group, chosen by name as the records do: tok_emb/lm_head -> embed, ".mlp." -> mlp,
    # ".attn." -> attn, anything else -> other (the records' MATRIX_CLIP_SIGMAS).
    sdclip_k_embed: float = 20.0
    sdclip_k_mlp: float = 12.85
    sdclip_k_attn: float = 12.85
    sdclip_k_other: float = 12.85
    # Hessian-aware SDClip (2026-04-06 non-record): scale * (1 + lambda (row_importance - 1)), with
    # row importance from diag(H); applies to GPTQ tensors with the sd rule. 0 = off (R4-R7).
    sdclip_hessian_lambda: float = 0.0
    # Quant-gate (R6/R7): 2-D ``*.attn_gate_w`` tensors with 32..8192 elements get this format
    # before the control / float-passthrough rules; "" = off. Records: int8:max:sym:nofloor.
    gate_format: str = ""
    # LQER (R7): rank-r SVD corrections of the top-K integer tensors by ||W - W_hat||_F.
    lqer_top_k: int = 0  # 0 = off; R7: 3
    lqer_rank: int = 4
    lqer_mode: str = "asym"  # asym: A int2 (one scale), B int4 (group scales); sym: both int<bits> per row
    lqer_group: int = 64  # asym group size over the flattened B (falls back to sym if it does not divide)
    lqer_factor_bits: int = 4  # bits of the symmetric factors
    budget_bytes: int = 16_000_000  # decimal, code + compressed model

    def validate(self) -> None:
        from pgolf.errors import ConfigError

        from pgolf.quant.formats import parse_format

        for key in ("kure_weight", "r2_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"quant.{key}: must be >= 0 (0 = off), got {getattr(self, key)}")
        if self.rotate not in ("none", "hadamard"):
            raise ConfigError(f"quant.rotate: must be none or hadamard, got {self.rotate!r}")
        if self.hidden_order not in ("off", "greedy"):
            raise ConfigError(f"quant.hidden_order: must be off or greedy, got {self.hidden_order!r}")
        if not 0 <= self.rotate_seed < 1 << 62:
            raise ConfigError(f"quant.rotate_seed: must be in [0, 2^62), got {self.rotate_seed}")
        for key in ("embed_format", "attn_format", "mlp_format", "other_format", "small_format", "control_format"):
            try:
                parse_format(getattr(self, key))
            except ValueError as exc:
                raise ConfigError(f"quant.{key}: {exc}") from None
        for entry in self.name_formats:
            pattern, sep, fmt = entry.partition("=")
            if not sep or not pattern:
                raise ConfigError(f"quant.name_formats: entry {entry!r} must look like 'pattern=format'")
            try:
                parse_format(fmt)
            except ValueError as exc:
                raise ConfigError(f"quant.name_formats: {entry!r}: {exc}") from None
        if self.qat not in ("off", "always", "late"):
            raise ConfigError(f"quant.qat: must be off, always or late, got {self.qat!r}")
        if self.gptq not in ("off", "full"):
            raise ConfigError(f"quant.gptq: must be off or full, got {self.gptq!r}")
        if self.gptq_calib_source not in ("train", "self"):
            raise ConfigError(
                f"quant.gptq_calib_source: must be train or self, got {self.gptq_calib_source!r} "
                "(validation tokens can never be used for calibration)"
            )
        if self.gptq_reserve_seconds < 0 and self.gptq_reserve_seconds != -1:
            raise ConfigError(f"quant.gptq_reserve_seconds: must be >= 0, or -1 (auto: the Hessian collection measured at start + 20%), got {self.gptq_reserve_seconds}")
        if self.gate_format:
            try:
                gate = parse_format(self.gate_format)
            except ValueError as exc:
                raise ConfigError(f"quant.gate_format: {exc}") from None
            if gate.kind != "int":
                raise ConfigError(f"quant.gate_format: must be an integer format (records: int8:max:sym:nofloor) or empty, got {self.gate_format!r}")
        for key in ("sdclip_k_embed", "sdclip_k_mlp", "sdclip_k_attn", "sdclip_k_other"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"quant.{key}: must be positive (clip = k * row std), got {getattr(self, key)}")
        if not 0.0 <= self.sdclip_hessian_lambda < 1.0:
            raise ConfigError(f"quant.sdclip_hessian_lambda: must be in [0, 1), got {self.sdclip_hessian_lambda}")
        if self.gptq_calib_batches < 0:
            raise ConfigError(f"quant.gptq_calib_batches: must be >= 0 (0: use gptq_calib_seqs), got {self.gptq_calib_batches}")
        if self.lqer_top_k < 0 or self.lqer_rank <= 0 or self.lqer_group <= 0:
            raise ConfigError(f"quant.lqer_top_k must be >= 0, lqer_rank and lqer_group positive; got {self.lqer_top_k}, {self.lqer_rank}, {self.lqer_group}")
        if self.lqer_mode not in ("asym", "sym"):
            raise ConfigError(f"quant.lqer_mode: must be asym or sym, got {self.lqer_mode!r}")
        if not 2 <= self.lqer_factor_bits <= 8:
            raise ConfigError(f"quant.lqer_factor_bits: must be in 2..8, got {self.lqer_factor_bits}")
        if self.gptq_calib_seqs <= 0 or self.gptq_block_size <= 0 or self.gptq_calib_seq_len < 0:
            raise ConfigError("quant.gptq_calib_seqs and quant.gptq_block_size must be positive, quant.gptq_calib_seq_len >= 0")
        if not self.gptq_damp > 0 or not self.gptq_temperature > 0:
            raise ConfigError(f"quant.gptq_damp and quant.gptq_temperature must be positive, got {self.gptq_damp}, {self.gptq_temperature}")
        if self.packing not in ("int8", "bitpack", "entropy", "ctx", "auto"):
            raise ConfigError(f"quant.packing: must be int8, bitpack, entropy, ctx or auto, got {self.packing!r}")
        if self.scale_dtype not in ("fp16", "fp32", "bf16"):
            raise ConfigError(f"quant.scale_dtype: must be fp16, bf16 or fp32, got {self.scale_dtype!r}")
        if self.budget_bytes <= 0:
            raise ConfigError(f"quant.budget_bytes: must be positive, got {self.budget_bytes}")
        from pgolf.quant.codecs import CODEC_NAMES

        if self.codec not in CODEC_NAMES + ("auto",):
            raise ConfigError(f"quant.codec: must be one of {', '.join(CODEC_NAMES + ('auto',))}, got {self.codec!r}")
