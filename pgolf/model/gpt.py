"""The GPT of the challenge baseline, with the record stacks' techniques as build-time options.

State-dict names are those of the challenge's ``train_gpt.py`` (``tok_emb.weight``,
``skip_weights``, ``blocks.{i}.attn.c_q.weight``, ..., ``blocks.{i}.resid_mix``) and of the record
scripts for their extras (``smear.gate``, ``bigram.embed.weight``, ``bigram.proj.weight``,
``bigram.scale``, ``ve_shared.*``, ``ve_layer_scales.{k}``), so their checkpoints load strictly.

Forward pass (ids [B, T]):
  x = tok_emb[ids] (SmearGate v2) (+ BigramHash) -> RMSNorm -> (SmearGate v1) = x0
  the virtual layer list (physical block indices; with loops some repeat) is cut in half:
  encoder steps, each output pushed on a stack;
  decoder step j: x = merge_skip(j, x, stack.pop()) (while the stack lasts), then its block;
  the last decoder steps may run as two lanes (attention lane, MLP lane), averaged at the end;
  final RMSNorm -> logits = x @ E^T (tied) -> 30 * tanh(logits / 30) -> cross-entropy in fp32
  (training adds the MTP heads' loss when configured; evaluation divides the logits by
  eval.temperature when it is not 1, through ``set_eval_temperature``)

Every choice (loops, residual form, skip rule, gates, smear) is made at build time: a list of
layer indices or a plain function stored on the module, never a branch on the config in forward.
Training, evaluation, sliding windows and test-time training all run this one forward; TTT
adapters wrap this model's own linear modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.attention import AttentionKernel, CausalSelfAttention, causal_only, resolve_attention_kernel, sdpa_attention
from pgolf.model.config import ModelConfig
from pgolf.model.layers import CastedLinear, Passthrough, RMSNorm
from pgolf.model.residual import FINAL_LANE, additive_skip, gated_skip, parallel_residual, sequential_residual, two_lane_step


class MLP(nn.Module):
    """fc -> relu^2 (or LeakyReLU(slope)^2) -> proj; proj starts at zero."""

    def __init__(self, dim: int, hidden: int, activation: str, leaky_slope: float):
        super().__init__()
        self.fc = CastedLinear(dim, hidden)
        self.proj = CastedLinear(hidden, dim, zero_init=True)
        self.negative_slope = leaky_slope if activation == "leaky_relu2" else 0.0

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h = F.leaky_relu(h, self.negative_slope) if self.negative_slope else torch.relu(h)
        return self.proj(h.square())


class Block(nn.Module):
    """x_in = mix0 * x + mix1 * x0; then attention and MLP branches on the residual stream, combined
    by ``residual`` (sequential, or GPT-J parallel from ``parallel_start``; see ``residual.py``)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, kernel: AttentionKernel):
        super().__init__()
        dim = cfg.model_dim
        norm_scale = 1.0 / math.sqrt(layer_idx + 1) if cfg.ln_scale else 1.0
        self.attn_norm = RMSNorm(norm_scale)
        self.mlp_norm = RMSNorm(norm_scale)
        self.attn = CausalSelfAttention(
            dim,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.effective_rope_dims,
            cfg.rope_base,
            cfg.qk_gain_init,
            xsa=layer_idx >= cfg.num_layers - cfg.xsa_last_n,
            kernel=kernel,
            rope_ntk_train_len=cfg.rope_ntk_train_len if cfg.rope_scaling == "ntk" else 0,
            out_gate=cfg.attn_out_gate,
            gate_window=cfg.gate_window,
            gate_src=cfg.attn_out_gate_src,
            gate_scale=cfg.sparse_gate_scale,
        )
        if cfg.mlp_kind == "relu2":
            self.mlp: nn.Module = MLP(dim, cfg.mlp_hidden, cfg.mlp_activation, cfg.leaky_relu_slope)
        else:  # swiglu | star_relu (experiment switch, pgolf.model.mlp_variants)
            from pgolf.model.mlp_variants import build_mlp_variant

            self.mlp = build_mlp_variant(cfg.mlp_kind, dim, cfg.mlp_hidden, cfg.swiglu_hidden)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())
        gptj = cfg.parallel_residual == "gptj" and layer_idx >= cfg.parallel_start
        self.residual = parallel_residual if gptj else sequential_residual

    def mix_input(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        return mix[0][None, None, :] * x + mix[1][None, None, :] * x0

    def attn_branch(self, x: Tensor, value_embed: Tensor | None) -> Tensor:
        return self.attn_scale.to(x.dtype)[None, None, :] * self.attn(self.attn_norm(x), value_embed)

    def mlp_branch(self, x: Tensor) -> Tensor:
        return self.mlp_scale.to(x.dtype)[None, None, :] * self.mlp(self.mlp_norm(x))

    def forward(self, x: Tensor, x0: Tensor, value_embed: Tensor | None = None) -> Tensor:
        return self.residual(self, x, x0, value_embed)


def unsmeared(model: nn.Module, x: Tensor, ids: Tensor) -> Tensor:
    """The raw-embedding smear when SmearGate v2 is off."""
    return x


def untempered(model: nn.Module, logits: Tensor) -> Tensor:
    """``GPT.temper_logits`` at eval.temperature = 1: the logits unchanged (bit-identical)."""
    return logits


def tempered(model: nn.Module, logits: Tensor) -> Tensor:
    """``GPT.temper_logits`` at eval.temperature = T != 1: logits / T before the softmax."""
    return logits / model.eval_temperature


def unadapted_logits(model: nn.Module, hidden: Tensor, logits: Tensor) -> Tensor:
    """The pre-softcap logits hook (``GPT.adapt_logits``) when no LM-head adapter is attached
    (phased TTT's per-document head LoRA replaces it on its copy of the model)."""
    return logits


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, kernel: AttentionKernel | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        kernel = kernel or sdpa_attention
        self.prepare_attention = causal_only
        if cfg.doc_attention_window > 0:  # R6/R7: attention never crosses a BOS (pgolf.model.attention)
            from pgolf.model.attention import DocumentAttention, mask_documents

            self.doc_attention = DocumentAttention(cfg.bos_id, cfg.doc_attention_window, cfg.attention_backend)
            kernel = self.doc_attention
            self.prepare_attention = mask_documents
        bos_id = cfg.bos_id if cfg.doc_aware else None
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        # Optional parts are imported only when used: a bundled submission carries no dead code.
        self.bigram: nn.Module = Passthrough()
        if cfg.bigram_buckets > 0:
            from pgolf.model.bigram import BigramHash

            self.bigram = BigramHash(cfg.bigram_buckets, cfg.bigram_dim, cfg.model_dim, cfg.bigram_scale_init, bos_id)
        self.smear: nn.Module = Passthrough()
        if cfg.smear_gate:
            from pgolf.model.smear import SmearGate

            self.smear = SmearGate(cfg.model_dim, bos_id)
        self.embed_smear = unsmeared
        if cfg.smear_gate_v2:
            from pgolf.model.smear import smear_v2

            self.embed_smear = smear_v2
            self.smear_gate = CastedLinear(cfg.gate_window, 1, zero_init=True)
            self.smear_lambda = nn.Parameter(torch.zeros(1, dtype=torch.float32))
            self.smear_bos_id = cfg.bos_id if cfg.smear_bos_mask else None
        num_skips = cfg.num_skip_weights()
        self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.model_dim, dtype=torch.float32))
        self.merge_skip = additive_skip
        if cfg.skip_gates:
            self.skip_gates = nn.Parameter(torch.zeros(num_skips, cfg.model_dim, dtype=torch.float32))
            self.merge_skip = gated_skip
        self.blocks = nn.ModuleList([Block(cfg, i, kernel) for i in range(cfg.num_layers)])
        if cfg.value_residual:  # VRL: later blocks mix in block 0's values (pgolf.model.value_residual)
            from pgolf.model.value_residual import attach_value_residual

            attach_value_residual(self.blocks)
        if cfg.parallel_residual == "two_lane":
            # Rows of layers before parallel_start exist but are unused (as in the records).
            self.parallel_post_lambdas = nn.Parameter(torch.ones(cfg.num_layers, 2, 2, dtype=torch.float32))
            self.parallel_resid_lambdas = nn.Parameter(torch.full((cfg.num_layers, 2), cfg.parallel_resid_lambda_init, dtype=torch.float32))
        self.final_lane = FINAL_LANE[cfg.parallel_final_lane]
        self.adapt_logits = unadapted_logits
        # Evaluation always runs with the loops on; training switches them off until loop_enable_at.
        self.set_looping(cfg.num_loops > 0)
        ve_layers = cfg.resolved_ve_layers()
        if ve_layers:
            from pgolf.model.value_embed import SharedValueEmbedding

            self.ve_shared = SharedValueEmbedding(cfg.vocab_size, cfg.ve_dim, cfg.kv_dim, cfg.ve_scale_init)
            self.ve_layer_scales = nn.ParameterList(
                [nn.Parameter(torch.ones(1, dtype=torch.float32)) for _ in ve_layers]
            )
        # block index -> index into ve_layer_scales (or -1): fixed at build time.
        self.ve_slot = [ve_layers.index(i) if i in ve_layers else -1 for i in range(cfg.num_layers)]
        self.final_norm = RMSNorm()
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.model_dim, cfg.vocab_size, zero_init=True)
        # Training-only multi-token prediction heads (never exported; pgolf.model.mtp).
        self.mtp_heads: nn.Module = Passthrough()
        if cfg.mtp_heads > 0:
            from pgolf.model.mtp import MTPHeads

            with torch.random.fork_rng(devices=[]):  # zero heads: the trunk's seeded init is unchanged
                self.mtp_heads = MTPHeads(cfg.mtp_heads, cfg.model_dim, cfg.vocab_size, cfg.mtp_weight)
        if cfg.tanh_reparam > 0:  # W_eff = a tanh(W / a) on the block matrices (pgolf.model.export_view)
            from pgolf.model.export_view import attach_tanh_reparam

            attach_tanh_reparam(self, cfg.tanh_reparam)
        self.set_eval_temperature(1.0)
        self.init_weights()

    def set_eval_temperature(self, temperature: float) -> None:
        """eval.temperature: ``token_nll`` (every evaluation: standard, sliding, TTT) scores
        softmax(logits / T); T = 1 keeps the logits untouched. ``forward`` (training) never divides."""
        self.eval_temperature = float(temperature)
        self.temper_logits = untempered if self.eval_temperature == 1.0 else tempered

    def set_looping(self, active: bool) -> None:
        """Choose the virtual layer list (loops on or off) and cut it into the encoder steps, the
        single-lane decoder steps and the two-lane decoder steps. New list objects each time, so a
        compiled graph guarded on the old lists recompiles (one graph per setting)."""
        cfg = self.cfg
        layers = cfg.virtual_layers(looping=active)
        n_enc = len(layers) // 2
        decoder = layers[n_enc:]
        n_lanes = 0
        if cfg.parallel_residual == "two_lane":
            while n_lanes < len(decoder) and decoder[len(decoder) - 1 - n_lanes] >= cfg.parallel_start:
                n_lanes += 1
        self.looping_active = bool(active and cfg.num_loops > 0)
        self.encoder_layers = list(layers[:n_enc])
        self.decoder_layers = list(decoder[: len(decoder) - n_lanes])
        self.lane_layers = list(decoder[len(decoder) - n_lanes :])

    # --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every tensor (uses the global torch RNG, so the seed fixes the result).

        * ``tok_emb.weight``: N(0, tied_embed_init_std^2) (0.005); with ``embed_init=overtone``
          its spectrum is then replaced by S_k = S_1 / sqrt(k) (same singular vectors).
        * every ``CastedLinear`` marked ``zero_init`` (``attn.proj``, ``mlp.proj``, untied
          ``lm_head``): zeros, so each block starts as the identity on the residual stream.
        * other ``CastedLinear`` weights (``c_q``, ``c_k``, ``c_v``, ``mlp.fc``, ``bigram.proj``,
          ``ve_shared.proj``): ``linear_init=default``: U(+-1/sqrt(fan_in)) (nn.Linear's
          kaiming-uniform); ``linear_init=orthogonal``: orthogonal (gain 1) when both dims >= 64,
          and modules whose name ends in ``.proj`` are then scaled by 1/sqrt(2 * num_layers).
          ``bigram.proj`` with ``bigram_proj_init=zero``: zeros.
        * ``bigram.embed.weight``: zeros (PR #401), or N(0, bigram_table_init_std^2) if > 0.
        * ``bigram.scale``: bigram_scale_init (0.05). ``smear.gate``: zeros (g = 0.5).
        * ``ve_shared.embed.weight``: N(0, ve_table_init_std^2) (0.01); ``ve_shared.scale``:
          ve_scale_init (0.1); ``ve_layer_scales.k``: ones.
        * ``skip_weights``, ``attn_scale``, ``mlp_scale``: ones; ``resid_mix``: rows (ones, zeros);
          ``q_gain``: qk_gain_init (1.5).
        * ``skip_gates``: zeros (an even 0.5/0.5 skip mix). ``parallel_post_lambdas``: ones;
          ``parallel_resid_lambdas``: parallel_resid_lambda_init (1.1).
        * attention output gates: ``attn.attn_gate_proj`` (attn_out): zeros (zero_init, g = 1);
          ``attn.attn_gate_w``: dense N(0, dense_gate_init_std^2) (0.01), sparse
          N(0, sparse_gate_init_std^2) or zeros when that std is 0 (g = 0.5).
        * SmearGate v2: ``smear_gate.weight`` zeros (zero_init), ``smear_lambda`` zero (identity).
        * experiment switches: ``mtp_heads.{k}.weight`` zeros (zero_init); SwiGLU ``mlp.gate`` as
          the other linears, its ``mlp.proj`` zeros; StarReLU ``mlp.star_scale`` one and
          ``mlp.star_bias`` zero (the relu^2 MLP at init); ``attn.vr_lambda`` (0.5, 0.5).
        """
        cfg = self.cfg
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=cfg.tied_embed_init_std)
        if cfg.embed_init == "overtone":
            overtone_spectrum_(self.tok_emb.weight)
        depth_scale = 1.0 / math.sqrt(2 * cfg.num_layers)
        for name, module in self.named_modules():
            if not isinstance(module, CastedLinear):
                continue
            w = module.weight
            if module.zero_init or (name == "bigram.proj" and cfg.bigram_proj_init == "zero"):
                nn.init.zeros_(w)
            elif cfg.linear_init == "orthogonal" and min(w.shape) >= 64:
                nn.init.orthogonal_(w, gain=1.0)
                if name.endswith(".proj") or ".proj." in name:
                    w.mul_(depth_scale)
            else:
                bound = 1.0 / math.sqrt(w.size(1))
                nn.init.uniform_(w, -bound, bound)
        if cfg.bigram_buckets > 0:
            if cfg.bigram_table_init_std > 0:
                nn.init.normal_(self.bigram.embed.weight, std=cfg.bigram_table_init_std)
            else:
                nn.init.zeros_(self.bigram.embed.weight)
            self.bigram.scale.fill_(cfg.bigram_scale_init)
        if cfg.smear_gate:
            self.smear.gate.zero_()
        if hasattr(self, "ve_shared"):
            nn.init.normal_(self.ve_shared.embed.weight, std=cfg.ve_table_init_std)
            self.ve_shared.scale.fill_(cfg.ve_scale_init)
            for p in self.ve_layer_scales:
                p.fill_(1.0)
        self.skip_weights.fill_(1.0)
        if cfg.skip_gates:
            self.skip_gates.zero_()
        if cfg.parallel_residual == "two_lane":
            self.parallel_post_lambdas.fill_(1.0)
            self.parallel_resid_lambdas.fill_(cfg.parallel_resid_lambda_init)
        if cfg.smear_gate_v2:
            self.smear_lambda.zero_()
        gate_std = {"dense": cfg.dense_gate_init_std, "sparse": cfg.sparse_gate_init_std}.get(cfg.attn_out_gate, 0.0)
        for block in self.blocks:
            if cfg.attn_out_gate in ("dense", "sparse") and gate_std > 0:
                nn.init.normal_(block.attn.attn_gate_w, std=gate_std)
            elif cfg.attn_out_gate in ("dense", "sparse"):
                block.attn.attn_gate_w.zero_()
            block.attn_scale.fill_(1.0)
            block.mlp_scale.fill_(1.0)
            block.resid_mix[0].fill_(1.0)
            block.resid_mix[1].fill_(0.0)
            block.attn.q_gain.fill_(cfg.qk_gain_init)
            if cfg.mlp_kind == "star_relu":
                block.mlp.star_scale.fill_(1.0)
                block.mlp.star_bias.fill_(0.0)
            if hasattr(block.attn, "vr_lambda"):
                block.attn.vr_lambda.copy_(torch.tensor((0.5, 0.5)))

    # --------------------------------------------------------------------------------------------
    def value_embeds(self, ids: Tensor, dtype: torch.dtype) -> list[Tensor | None]:
        """Per-block value-embedding inputs (None for blocks without VE)."""
        if not hasattr(self, "ve_shared"):
            return [None] * len(self.blocks)
        ve = self.ve_shared(ids, dtype)
        return [None if k < 0 else ve * self.ve_layer_scales[k].to(dtype) for k in self.ve_slot]

    def forward_hidden(self, ids: Tensor) -> Tensor:
        """ids [B, T] -> final-normed hidden states [B, T, model_dim]."""
        self.prepare_attention(self, ids)
        x = self.tok_emb(ids)
        x = self.embed_smear(self, x, ids)
        x = self.bigram(x, ids)
        x = F.rms_norm(x, (x.size(-1),))
        x = self.smear(x, ids)
        x0 = x
        value_embeds = self.value_embeds(ids, x.dtype)
        skips: list[Tensor] = []
        for i in self.encoder_layers:
            x = self.blocks[i](x, x0, value_embeds[i])
            skips.append(x)
        j = 0
        for i in self.decoder_layers:
            if skips:
                x = self.merge_skip(self, j, x, skips.pop())
            x = self.blocks[i](x, x0, value_embeds[i])
            j += 1
        if self.lane_layers:  # fixed at build time: two-lane decoder steps (R6/R7)
            lane0, lane1 = x, x
            for i in self.lane_layers:
                if skips:
                    lane0 = self.merge_skip(self, j, lane0, skips.pop())
                lane0, lane1 = two_lane_step(self, i, lane0, lane1, x0, value_embeds[i])
                j += 1
            x = self.final_lane(lane0, lane1)
        return self.final_norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [..., model_dim] -> soft-capped logits [..., vocab] (fp32, or fp64 for a fp64 model)."""
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = self.adapt_logits(self, hidden, F.linear(hidden, w.to(hidden.dtype)))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # CE in (at least) fp32
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap)

    def forward(self, ids: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats) over all positions: the training loss (plus the
        MTP heads' weighted loss when configured; a Passthrough otherwise)."""
        hidden = self.forward_hidden(ids)
        logits = self.logits(hidden)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return self.mtp_heads(loss, hidden, targets, self.cfg.logit_softcap)

    def token_nll(self, ids: Tensor, targets: Tensor, first_scored: int = 0) -> Tensor:
        """Per-token NLL [B, T - first_scored] of positions first_scored..T-1; the LM head and the
        cross-entropy run only on those positions."""
        hidden = self.forward_hidden(ids)[:, first_scored:]
        logits = self.temper_logits(self, self.logits(hidden))
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets[:, first_scored:].reshape(-1), reduction="none")
        return nll.view(hidden.shape[:2])


def overtone_spectrum_(weight: Tensor) -> None:
    """Replace the singular values of ``weight`` by S_1 * k^(-1/2), k = 1..r (in place)."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    k = torch.arange(1, s.numel() + 1, dtype=torch.float32, device=s.device)
    weight.copy_((u * (s[0] * k.rsqrt())) @ vh)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> GPT:
    """Build on CPU (the seeded init is device-independent), then move to ``device``."""
    model = GPT(cfg, kernel=resolve_attention_kernel(cfg.attention_backend, device))
    return model.to(device)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total and per top-level group (tok_emb, blocks, skip_weights, bigram, smear, ve_*, lm_head).
    The total counts the exported model: training-only MTP heads are listed as ``mtp_heads``
    (training only) but not in ``total``."""
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        groups[top] = groups.get(top, 0) + p.numel()
    groups = dict(sorted(groups.items()))
    return {"total": sum(v for k, v in groups.items() if k != "mtp_heads"), **groups}
