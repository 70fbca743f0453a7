"""An independent, deliberately naive float64 reference of the challenge GPT and the record
stacks' techniques, written from techniques.md (not from pgolf's modules): explicit loops over
heads, an explicit causal softmax, rotary by pairs. Tests compare pgolf's model against it on the
same weights, so a bug in pgolf's vectorised code cannot hide behind itself."""

from __future__ import annotations

import math

import torch


def rms(x: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(x.dtype).eps
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)


def rotate(x: torch.Tensor, rope_dims: int, base: float) -> torch.Tensor:
    """x [T, D]: rotate the pairs (i, i + rope_dims/2), i < rope_dims/2, by angle t * base^(-2i/r)."""
    out = x.clone()
    half = rope_dims // 2
    for t in range(x.shape[0]):
        for i in range(half):
            theta = t * base ** (-2.0 * i / rope_dims)
            c, s = math.cos(theta), math.sin(theta)
            a, b = x[t, i], x[t, i + half]
            out[t, i] = a * c + b * s
            out[t, i + half] = -a * s + b * c
    return out


def bigram_hash(seq: list[int], buckets: int) -> list[int]:
    m = buckets - 1
    return [m] + [((36313 * seq[i]) ^ (27191 * seq[i - 1])) % m for i in range(1, len(seq))]


def virtual_layers(cfg) -> list[int]:
    """frontier.md 3.1: [0..a-1] + (a..b) repeated n+1 times + [b+1..L-1]."""
    L = cfg.num_layers
    if not getattr(cfg, "num_loops", 0):
        return list(range(L))
    a, b, n = cfg.loop_start, cfg.loop_end, cfg.num_loops
    return list(range(a)) + list(range(a, b + 1)) * (n + 1) + list(range(b + 1, L))


def rope_base(cfg, T: int) -> float:
    """The scripts' NTK rule (techniques.md 8) when rope_scaling is ntk, else the fixed base."""
    r = cfg.rope_dims or cfg.model_dim // cfg.num_heads
    if getattr(cfg, "rope_scaling", "none") == "ntk" and T > cfg.rope_ntk_train_len:
        return cfg.rope_base * (T / cfg.rope_ntk_train_len) ** (r / (r - 2))
    return cfg.rope_base


def reference_loss(sd: dict[str, torch.Tensor], cfg, ids: torch.Tensor, targets: torch.Tensor, looping: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch, float64. ``looping=False``: the loop-free list."""
    sd = {k: v.double() for k, v in sd.items()}
    L, H, Hkv = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads
    D = cfg.model_dim // H
    r = cfg.rope_dims or D
    ve_layers = sorted({i % L for i in cfg.ve_layers})
    layers = virtual_layers(cfg) if looping else list(range(L))
    n_enc = len(layers) // 2
    two_lane = getattr(cfg, "parallel_residual", "none") == "two_lane"
    gptj = getattr(cfg, "parallel_residual", "none") == "gptj"
    gate_kind = getattr(cfg, "attn_out_gate", "none")
    losses = []
    for b in range(ids.shape[0]):
        seq = ids[b].tolist()
        T = len(seq)
        base = rope_base(cfg, T)
        x = sd["tok_emb.weight"][ids[b]]
        if getattr(cfg, "smear_gate_v2", False):
            e = x.clone()
            w = cfg.gate_window
            for t in range(1, T):
                if cfg.smear_bos_mask and seq[t] == cfg.bos_id:
                    continue
                g = torch.sigmoid(e[t, :w] @ sd["smear_gate.weight"][0])
                e[t] = e[t] + sd["smear_lambda"][0] * g * x[t - 1]
            x = e
        if cfg.bigram_buckets:
            h = sd["bigram.embed.weight"][torch.tensor(bigram_hash(seq, cfg.bigram_buckets))]
            if "bigram.proj.weight" in sd:
                h = h @ sd["bigram.proj.weight"].T
            x = x + sd["bigram.scale"] * h
        x = rms(x)
        if cfg.smear_gate:
            g = torch.sigmoid(sd["smear.gate"])
            prev = torch.cat([torch.zeros_like(x[:1]), x[:-1]])
            x = (1 - g) * x + g * prev
        x0 = x
        ve = None
        if ve_layers:
            ve = sd["ve_shared.scale"] * (sd["ve_shared.embed.weight"][ids[b]] @ sd["ve_shared.proj.weight"].T)

        def attn(i: int, h_in: torch.Tensor) -> torch.Tensor:
            """attn_scale * Attn(rms(h_in) * c) of physical block i."""
            p = f"blocks.{i}."
            c = 1.0 / math.sqrt(i + 1) if cfg.ln_scale else 1.0
            a_in = rms(h_in) * c
            q = a_in @ sd[p + "attn.c_q.weight"].T
            k = a_in @ sd[p + "attn.c_k.weight"].T
            v = a_in @ sd[p + "attn.c_v.weight"].T
            if i in ve_layers:
                v = v + ve * sd[f"ve_layer_scales.{ve_layers.index(i)}"]
            heads = []
            for hq in range(H):
                hk = hq // (H // Hkv)
                qh = rotate(rms(q[:, hq * D : (hq + 1) * D]), r, base) * sd[p + "attn.q_gain"][hq]
                kh = rotate(rms(k[:, hk * D : (hk + 1) * D]), r, base)
                vh = v[:, hk * D : (hk + 1) * D]
                scores = qh @ kh.T / math.sqrt(D)
                mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
                window = getattr(cfg, "doc_attention_window", 0)
                if window:  # document masking: no key before the query's document (cut every window tokens)
                    for t in range(T):
                        doc = max(j for j in range(t + 1) if j == 0 or seq[j] == cfg.bos_id)
                        mask[t, : doc + (t - doc) // window * window] = True
                scores = scores.masked_fill(mask, float("-inf"))
                y = torch.softmax(scores, dim=-1) @ vh
                if i >= L - cfg.xsa_last_n:
                    vhat = vh / vh.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                    y = y - (y * vhat).sum(-1, keepdim=True) * vhat
                if gate_kind == "sparse":
                    y = y * torch.sigmoid(cfg.sparse_gate_scale * (a_in[:, : cfg.gate_window] @ sd[p + "attn.attn_gate_w"][hq]))[:, None]
                elif gate_kind == "dense":
                    y = y * torch.sigmoid(a_in @ sd[p + "attn.attn_gate_w"][hq])[:, None]
                elif gate_kind == "attn_out":
                    src = q if cfg.attn_out_gate_src == "q" else a_in
                    y = y * 2 * torch.sigmoid(src[:, : cfg.gate_window] @ sd[p + "attn.attn_gate_proj.weight"][hq])[:, None]
                heads.append(y)
            return sd[p + "attn_scale"] * (torch.cat(heads, dim=-1) @ sd[p + "attn.proj.weight"].T)

        def mlp(i: int, h_in: torch.Tensor) -> torch.Tensor:
            p = f"blocks.{i}."
            c = 1.0 / math.sqrt(i + 1) if cfg.ln_scale else 1.0
            hdn = (rms(h_in) * c) @ sd[p + "mlp.fc.weight"].T
            hdn = torch.where(hdn > 0, hdn, hdn * (cfg.leaky_relu_slope if cfg.mlp_activation == "leaky_relu2" else 0.0))
            return sd[p + "mlp_scale"] * ((hdn * hdn) @ sd[p + "mlp.proj.weight"].T)

        def mixed(i: int, h: torch.Tensor) -> torch.Tensor:
            mix = sd[f"blocks.{i}.resid_mix"]
            return mix[0] * h + mix[1] * x0

        def skip(j: int, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            w = sd["skip_weights"][j]
            if getattr(cfg, "skip_gates", False):
                g = torch.sigmoid(sd["skip_gates"][j])
                return g * h + (1 - g) * w * s
            return h + w * s

        stack = []
        lanes = None
        for step, i in enumerate(layers):
            j = step - n_enc
            in_lanes = two_lane and j >= 0 and i >= cfg.parallel_start
            if in_lanes and lanes is None:
                lanes = [x, x]
            if j >= 0 and stack:
                if lanes is not None:
                    lanes[0] = skip(j, lanes[0], stack.pop())
                else:
                    x = skip(j, x, stack.pop())
            if lanes is not None:
                a = attn(i, mixed(i, lanes[0]))
                f = mlp(i, lanes[1])
                P, R = sd["parallel_post_lambdas"][i], sd["parallel_resid_lambdas"][i]
                lanes = [R[0] * lanes[0] + P[0, 0] * a + P[1, 0] * f, R[1] * lanes[1] + P[0, 1] * a + P[1, 1] * f]
                continue
            h = mixed(i, x)
            if gptj and i >= cfg.parallel_start:
                x = h + attn(i, h) + mlp(i, h)
            else:
                x = h + attn(i, h)
                x = x + mlp(i, x)
            if j < 0:
                stack.append(x)
        if lanes is not None:
            final = getattr(cfg, "parallel_final_lane", "mean")
            x = {"mean": 0.5 * (lanes[0] + lanes[1]), "attn": lanes[0], "mlp": lanes[1]}[final]
        logits = rms(x) @ sd["tok_emb.weight"].T
        logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        losses.append(-logp[torch.arange(T), targets[b]])
    return torch.cat(losses).mean()
