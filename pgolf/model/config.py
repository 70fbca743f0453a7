"""Model configuration: every architectural switch of the baseline and the three record stacks.

Defaults are the challenge baseline (9 x 512, 8 heads / 4 KV heads, relu^2 MLP 2x, tied
embeddings, RoPE base 10000, softcap 30). Each technique is a field whose "off" value builds
exactly the baseline module, so a preset file only names what it changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Names (substrings) of the small "control" tensors: they go to the scalar Adam group even when
# 2-D (resid_mix is 2 x d) and are kept in float at export. Baseline/PR #89 use the first five;
# PR #201 adds smear; PR #401 adds dtg_gate, ve_layer_scales and ve_shared.scale.
CONTROL_TENSOR_PATTERNS = (
    "attn_scale",
    "mlp_scale",
    "resid_mix",
    "q_gain",
    "skip_weight",
    "smear",
    "dtg_gate",
    "ve_layer_scales",
    "ve_shared.scale",
    "bigram.scale",
    # frontier records (R3-R7): sigmoid skip gates, two-lane lambdas, attention output gates,
    # SmearGate v2 (``smear_gate.weight``, ``smear_lambda``: covered by "smear").
    "skip_gates",
    "parallel_post_lambdas",
    "parallel_resid_lambdas",
    "attn_gate_proj",
    "attn_gate_w",
)


# model.mlp_kind=swiglu rounds its hidden width to a multiple of this (ModelConfig.swiglu_hidden).
SWIGLU_MULTIPLE = 32


def is_control_tensor(name: str) -> bool:
    return any(pattern in name for pattern in CONTROL_TENSOR_PATTERNS)


@dataclass(kw_only=True)
class ModelConfig:
    # --- shape -------------------------------------------------------------------------------
    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 2.0  # hidden = int(mlp_mult * model_dim)
    mlp_activation: str = "relu2"  # relu2 | leaky_relu2 (LeakyReLU(slope) then square)
    leaky_relu_slope: float = 0.5
    tie_embeddings: bool = True
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5
    # --- positions -----------------------------------------------------------------------------
    rope_base: float = 10000.0
    rope_dims: int = 0  # rotated dims per head; 0 means all of head_dim (partial RoPE if < head_dim)
    # none: the base is fixed (baseline, R4-R7: "YaRN off"). ntk: the PR #201/#401/R1-R3 scripts'
    # rule, decided per call from the sequence length T: base * (T / rope_ntk_train_len)^(r/(r-2))
    # when T > rope_ntk_train_len (r = rotated dims), else base.
    rope_scaling: str = "none"
    rope_ntk_train_len: int = 1024
    # --- init ----------------------------------------------------------------------------------
    tied_embed_init_std: float = 0.005
    embed_init: str = "normal"  # normal | overtone (spectral power-law, PR #201)
    linear_init: str = "default"  # default (kaiming-uniform, as nn.Linear) | orthogonal (PR #162 line)
    # --- extras of the record stacks -----------------------------------------------------------
    smear_gate: bool = False
    bigram_buckets: int = 0  # 0 = no BigramHash embedding
    bigram_dim: int = 128
    bigram_scale_init: float = 0.05
    bigram_table_init_std: float = 0.0  # 0 = zero table (PR #401); > 0 = N(0, std^2)
    bigram_proj_init: str = "orthogonal"  # orthogonal (scaled 1/sqrt(2L)) | zero
    xsa_last_n: int = 0  # exclusive self-attention on the last N blocks
    ln_scale: bool = False  # multiply block i's RMSNorm outputs by 1/sqrt(i+1)
    ve_dim: int = 128  # width of the shared value-embedding table (used when ve_layers is set)
    ve_layers: list[int] = field(default_factory=list)  # blocks with VE; [] = off; negatives count from the end
    ve_scale_init: float = 0.1
    ve_table_init_std: float = 0.01
    doc_aware: bool = False  # SmearGate/BigramHash do not mix across BOS (off in the record presets)
    bos_id: int = 1
    # --- frontier records (R3-R7, frontier.md section 3) ----------------------------------------
    # Depth recurrence: physical layers loop_start..loop_end repeated num_loops extra times in the
    # virtual layer list; off when num_loops = 0. Training switches the loops on at the training
    # fraction loop_enable_at (0 = from the start); evaluation always runs with loops on.
    loop_start: int = 0
    loop_end: int = 0
    num_loops: int = 0
    loop_enable_at: float = 0.0
    skip_gates: bool = False  # sigmoid-gated U-Net skips: x <- sig(g) x + (1 - sig(g)) w s (R3+)
    # Parallel residuals from physical layer parallel_start: gptj (R5: attention and MLP both read
    # the block input) or two_lane (R6/R7: attention lane and MLP lane with learned lambdas).
    parallel_residual: str = "none"  # none | gptj | two_lane
    parallel_start: int = 0
    parallel_final_lane: str = "mean"  # two_lane: mean | attn | mlp
    parallel_resid_lambda_init: float = 1.1
    # Per-head gate on the attention output (after XSA, before the projection); one kind at most.
    attn_out_gate: str = "none"  # none | attn_out (PR #1667) | dense (PR #1736) | sparse (R6/R7)
    attn_out_gate_src: str = "proj"  # attn_out only: proj (normalised block input) | q (raw q projection)
    gate_window: int = 12  # input dims read by the attn_out and sparse gates (and SmearGate v2)
    sparse_gate_scale: float = 1.0  # sparse: g = sigmoid(scale * W x[:window]); R6 1.0, R7 0.5
    sparse_gate_init_std: float = 0.0
    dense_gate_init_std: float = 0.01
    # SmearGate v2 (input-dependent, on the raw embedding, before the embedding norm; R7) and R7's
    # fix that never smears into a BOS position (without it packed documents leak into each other).
    smear_gate_v2: bool = False
    smear_bos_mask: bool = True
    # --- kernels -------------------------------------------------------------------------------
    attention_backend: str = "auto"  # auto | sdpa | flash3 (flash3 needs flash_attn_interface on CUDA)
    # Document-masked attention (R6/R7, for data.loader=packed): > 0 = attention never crosses a BOS
    # (bos_id) and documents longer than this are cut into pieces of this many tokens (the records'
    # cu_seqlens, 2048); the segments come from the ids. FlashAttention varlen on CUDA when
    # importable, an exact PyTorch equivalent elsewhere (pgolf.model.attention.DocumentAttention).
    doc_attention_window: int = 0
    # --- experiment switches (issue 16; off in every preset, README "Experiment switches") -------
    # Multi-token prediction: mtp_heads extra heads (head k predicts token t+1+k from position t's
    # final hidden state), their mean CE times mtp_weight added to the training loss only; the heads
    # are training-only tensors, dropped from the artifact (pgolf.model.export_view).
    mtp_heads: int = 0
    mtp_weight: float = 0.2
    # MLP kind: relu2 (fc -> mlp_activation -> proj), swiglu (silu(gate x) * fc x -> proj at
    # hidden swiglu_hidden, equal parameters) or star_relu (s * relu(fc x)^2 + b -> proj).
    mlp_kind: str = "relu2"
    value_residual: bool = False  # VRL: v <- l0 * v + l1 * v_first in every block after the first
    tanh_reparam: float = 0.0  # a > 0: block matrices used as a * tanh(W / a) (|W_eff| < a); 0 = off

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    @property
    def swiglu_hidden(self) -> int:
        """SwiGLU width at the relu^2 MLP's parameter count (3 d h' = 2 d h): 2/3 of mlp_hidden,
        rounded to the nearest multiple of SWIGLU_MULTIPLE (at least one multiple)."""
        return max(SWIGLU_MULTIPLE, round(2 * self.mlp_hidden / (3 * SWIGLU_MULTIPLE)) * SWIGLU_MULTIPLE)

    def export_config(self) -> "ModelConfig":
        """The config of the exported model: the training-only switches off (no MTP heads; tanh
        reparameterised weights are exported as their effective values, see export_view)."""
        from dataclasses import replace

        return replace(self, mtp_heads=0, tanh_reparam=0.0)

    def decoder_only_blocks(self) -> list[int]:
        """Physical blocks that run only in the decoder half of the (loops-on) virtual layer list:
        num_layers // 2 .. num_layers - 1 without loops (optim.decoder_lr_mult scales their matrices)."""
        layers = self.virtual_layers(looping=True)
        n_enc = len(layers) // 2
        return sorted(set(layers[n_enc:]) - set(layers[:n_enc]))

    @property
    def effective_rope_dims(self) -> int:
        return self.rope_dims if self.rope_dims > 0 else self.head_dim

    def virtual_layers(self, looping: bool) -> list[int]:
        """The physical block index of every virtual layer, in order (frontier.md 3.1): without
        loops (or with looping off) 0..L-1; with loops [0..a-1] + (a..b) x (n+1) + [b+1..L-1]."""
        plain = list(range(self.num_layers))
        if not looping or self.num_loops <= 0:
            return plain
        a, b = self.loop_start, self.loop_end
        return plain[:a] + list(range(a, b + 1)) * (self.num_loops + 1) + plain[b + 1 :]

    def num_skip_weights(self) -> int:
        """U-Net skip rows: min(|encoder|, |decoder|) of the longest virtual list (loops on)."""
        n = len(self.virtual_layers(looping=True))
        return min(n // 2, n - n // 2)

    def resolved_ve_layers(self) -> list[int]:
        """VE layer indices as non-negative block indices, sorted and de-duplicated."""
        out = sorted({i % self.num_layers if i < 0 else i for i in self.ve_layers})
        return out

    def validate(self) -> None:
        from pgolf.errors import ConfigError

        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"model.{key}: {why}")

        if self.num_layers < 1:
            raise bad("num_layers", f"must be >= 1, got {self.num_layers}")
        if self.model_dim % self.num_heads:
            raise bad("model_dim", f"{self.model_dim} is not divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise bad("num_kv_heads", f"num_heads={self.num_heads} is not a multiple of {self.num_kv_heads}")
        if self.head_dim % 2:
            raise bad("model_dim", f"head_dim={self.head_dim} must be even for RoPE")
        r = self.effective_rope_dims
        if r % 2 or r > self.head_dim:
            raise bad("rope_dims", f"must be even and <= head_dim={self.head_dim}, got {self.rope_dims}")
        if self.logit_softcap <= 0:
            raise bad("logit_softcap", f"must be positive, got {self.logit_softcap}")
        if self.mlp_activation not in ("relu2", "leaky_relu2"):
            raise bad("mlp_activation", f"must be relu2 or leaky_relu2, got {self.mlp_activation!r}")
        if self.embed_init not in ("normal", "overtone"):
            raise bad("embed_init", f"must be normal or overtone, got {self.embed_init!r}")
        if self.embed_init == "overtone" and not self.tie_embeddings:
            raise bad("embed_init", "overtone init is defined for tied embeddings only")
        if self.linear_init not in ("default", "orthogonal"):
            raise bad("linear_init", f"must be default or orthogonal, got {self.linear_init!r}")
        if self.bigram_proj_init not in ("orthogonal", "zero"):
            raise bad("bigram_proj_init", f"must be orthogonal or zero, got {self.bigram_proj_init!r}")
        if self.bigram_buckets and self.bigram_buckets < 2:
            raise bad("bigram_buckets", "needs at least 2 buckets (the last one is reserved), or 0 for off")
        if not 0 <= self.xsa_last_n <= self.num_layers:
            raise bad("xsa_last_n", f"must be in 0..num_layers={self.num_layers}, got {self.xsa_last_n}")
        for i in self.ve_layers:
            if not -self.num_layers <= i < self.num_layers:
                # An out-of-range VE layer would build a table that is never used (DDP then
                # fails on the first backward in the original scripts): refuse it up front.
                raise bad("ve_layers", f"index {i} is outside 0..{self.num_layers - 1} (or -1..-{self.num_layers})")
        if self.ve_layers and self.ve_dim <= 0:
            raise bad("ve_dim", f"must be positive when ve_layers is set, got {self.ve_dim}")
        if self.rope_scaling not in ("none", "ntk"):
            raise bad("rope_scaling", f"must be none or ntk, got {self.rope_scaling!r}")
        if self.rope_scaling == "ntk" and (r <= 2 or self.rope_ntk_train_len < 1):
            raise bad("rope_scaling", f"ntk needs rope_dims > 2 and rope_ntk_train_len >= 1 (rotated dims {r})")
        if self.num_loops < 0:
            raise bad("num_loops", f"must be >= 0, got {self.num_loops}")
        if self.num_loops and not 0 <= self.loop_start <= self.loop_end < self.num_layers:
            raise bad("loop_start", f"loops need 0 <= loop_start <= loop_end < num_layers={self.num_layers}, got {self.loop_start}..{self.loop_end}")
        if not 0.0 <= self.loop_enable_at < 1.0:
            raise bad("loop_enable_at", f"must be in [0, 1), got {self.loop_enable_at}")
        if self.parallel_residual not in ("none", "gptj", "two_lane"):
            raise bad("parallel_residual", f"must be none, gptj or two_lane, got {self.parallel_residual!r}")
        if self.parallel_final_lane not in ("mean", "attn", "mlp"):
            raise bad("parallel_final_lane", f"must be mean, attn or mlp, got {self.parallel_final_lane!r}")
        if self.parallel_residual == "two_lane":
            decoder = self.virtual_layers(looping=True)[len(self.virtual_layers(looping=True)) // 2 :]
            lanes = [i >= self.parallel_start for i in decoder]
            if True in lanes and not all(lanes[lanes.index(True) :]):
                raise bad("parallel_start", f"two_lane needs the lane blocks to be a suffix of the decoder {decoder}; raise parallel_start above the loop")
            if self.parallel_start < self.num_layers // 2:
                raise bad("parallel_start", f"two_lane runs in the decoder only: must be >= {self.num_layers // 2}, got {self.parallel_start}")
        if self.attn_out_gate not in ("none", "attn_out", "dense", "sparse"):
            raise bad("attn_out_gate", f"must be one of none, attn_out, dense, sparse (they are mutually exclusive), got {self.attn_out_gate!r}")
        if self.attn_out_gate_src not in ("proj", "q"):
            raise bad("attn_out_gate_src", f"must be proj or q, got {self.attn_out_gate_src!r}")
        if not 1 <= self.gate_window <= self.model_dim:
            raise bad("gate_window", f"must be in 1..model_dim={self.model_dim}, got {self.gate_window}")
        if self.smear_gate and self.smear_gate_v2:
            raise bad("smear_gate_v2", "SmearGate v1 (smear_gate) and v2 are alternatives; switch one off")
        if self.attention_backend not in ("auto", "sdpa", "flash3"):
            raise bad("attention_backend", f"must be auto, sdpa or flash3, got {self.attention_backend!r}")
        if self.doc_attention_window < 0:
            raise bad("doc_attention_window", f"must be 0 (off) or a positive number of tokens, got {self.doc_attention_window}")
        self.validate_switches(bad)

    def validate_switches(self, bad) -> None:
        """The experiment switches of issue 16."""
        if self.mtp_heads < 0:
            raise bad("mtp_heads", f"must be >= 0 (0 = off), got {self.mtp_heads}")
        if self.mtp_weight < 0:
            raise bad("mtp_weight", f"must be >= 0, got {self.mtp_weight}")
        if self.mlp_kind not in ("relu2", "swiglu", "star_relu"):
            raise bad("mlp_kind", f"must be relu2, swiglu or star_relu, got {self.mlp_kind!r}")
        if self.mlp_kind != "relu2" and self.mlp_activation != "relu2":
            raise bad("mlp_kind", f"{self.mlp_kind} has its own activation; set model.mlp_activation=relu2 (got {self.mlp_activation!r})")
        if self.value_residual and self.num_loops and self.loop_start == 0:
            raise bad("value_residual", "block 0 produces the first values and must run once; set model.loop_start >= 1")
        if self.tanh_reparam < 0:
            raise bad("tanh_reparam", f"must be 0 (off) or the bound a > 0, got {self.tanh_reparam}")
