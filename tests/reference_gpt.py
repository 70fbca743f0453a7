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


def reference_loss(sd: dict[str, torch.Tensor], cfg, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch, float64."""
    sd = {k: v.double() for k, v in sd.items()}
    L, H, Hkv = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads
    D = cfg.model_dim // H
    r = cfg.rope_dims or D
    ve_layers = sorted({i % L for i in cfg.ve_layers})
    losses = []
    for b in range(ids.shape[0]):
        seq = ids[b].tolist()
        T = len(seq)
        x = sd["tok_emb.weight"][ids[b]]
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
        n_enc = L // 2
        stack = []
        for i in range(L):
            if i >= n_enc:
                j = i - n_enc
                if stack:
                    x = x + sd["skip_weights"][j] * stack.pop()
            p = f"blocks.{i}."
            mix = sd[p + "resid_mix"]
            x = mix[0] * x + mix[1] * x0
            c = 1.0 / math.sqrt(i + 1) if cfg.ln_scale else 1.0
            a_in = rms(x) * c
            q = a_in @ sd[p + "attn.c_q.weight"].T
            k = a_in @ sd[p + "attn.c_k.weight"].T
            v = a_in @ sd[p + "attn.c_v.weight"].T
            if i in ve_layers:
                v = v + ve * sd[f"ve_layer_scales.{ve_layers.index(i)}"]
            heads = []
            for hq in range(H):
                hk = hq // (H // Hkv)
                qh = rotate(rms(q[:, hq * D : (hq + 1) * D]), r, cfg.rope_base) * sd[p + "attn.q_gain"][hq]
                kh = rotate(rms(k[:, hk * D : (hk + 1) * D]), r, cfg.rope_base)
                vh = v[:, hk * D : (hk + 1) * D]
                scores = qh @ kh.T / math.sqrt(D)
                mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
                scores = scores.masked_fill(mask, float("-inf"))
                y = torch.softmax(scores, dim=-1) @ vh
                if i >= L - cfg.xsa_last_n:
                    vhat = vh / vh.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                    y = y - (y * vhat).sum(-1, keepdim=True) * vhat
                heads.append(y)
            attn = torch.cat(heads, dim=-1) @ sd[p + "attn.proj.weight"].T
            x = x + sd[p + "attn_scale"] * attn
            m_in = rms(x) * c
            hdn = m_in @ sd[p + "mlp.fc.weight"].T
            hdn = torch.where(hdn > 0, hdn, hdn * (cfg.leaky_relu_slope if cfg.mlp_activation == "leaky_relu2" else 0.0))
            x = x + sd[p + "mlp_scale"] * ((hdn * hdn) @ sd[p + "mlp.proj.weight"].T)
            if i < n_enc:
                stack.append(x)
        logits = rms(x) @ sd["tok_emb.weight"].T
        logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        losses.append(-logp[torch.arange(T), targets[b]])
    return torch.cat(losses).mean()
