"""Causal self-attention with GQA, QK RMS-norm, (partial) RoPE, q_gain, optional XSA and an
optional value-embedding input. Optional parts are imported only when a config uses them, so
a generated submission file carries only the techniques its preset needs.

The attention kernel is chosen once at build time (``resolve_attention_kernel``): FlashAttention 3
(``flash_attn_interface``) when asked for or available on a Hopper GPU, otherwise PyTorch SDPA,
which runs on CPU and every GPU. Both take and return [B, T, H, D].
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.layers import CastedLinear, Passthrough, Rotary

AttentionKernel = Callable[[Tensor, Tensor, Tensor], Tensor]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention via F.scaled_dot_product_attention; q [B,T,H,D], k/v [B,T,Hkv,D]."""
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        enable_gqa=k.size(2) != q.size(2),
    )
    return y.transpose(1, 2)


def resolve_attention_kernel(backend: str, device: torch.device | str | None = None) -> AttentionKernel:
    """``auto`` picks FA3 only on a CUDA device with ``flash_attn_interface`` importable."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if backend == "sdpa" or (backend == "auto" and dev.type != "cuda"):
        return sdpa_attention
    try:
        from flash_attn_interface import flash_attn_func  # type: ignore[import-not-found]
    except ImportError:
        if backend == "flash3":
            from pgolf.errors import MissingDependencyError

            raise MissingDependencyError(
                "model.attention_backend=flash3 needs FlashAttention 3 (module flash_attn_interface); "
                "install it or set model.attention_backend=sdpa"
            ) from None
        return sdpa_attention

    def flash3_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = flash_attn_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out

    return flash3_attention


def ungated(attn: nn.Module, y: Tensor, x: Tensor, q_raw: Tensor) -> Tensor:
    """The attention output gate when none is configured (see ``pgolf.model.gates``)."""
    return y


class CausalSelfAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        rope_dims: int,
        rope_base: float,
        qk_gain_init: float,
        *,
        xsa: bool = False,
        kernel: AttentionKernel = sdpa_attention,
        rope_ntk_train_len: int = 0,
        out_gate: str = "none",
        gate_window: int = 12,
        gate_src: str = "proj",
        gate_scale: float = 1.0,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_dim)
        self.c_v = CastedLinear(dim, kv_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(rope_dims, rope_base, rope_ntk_train_len)
        self.xsa: nn.Module = Passthrough()
        if xsa:
            from pgolf.model.xsa import ExclusiveSelfAttention

            self.xsa = ExclusiveSelfAttention()
        self.kernel = kernel
        # A plain function chosen here (not a branch in forward); the parameters sit on this module.
        self.output_gate = ungated
        if out_gate != "none":
            from pgolf.model.gates import GATE_FUNCTIONS, add_gate_parameters

            self.output_gate = GATE_FUNCTIONS[out_gate]
            add_gate_parameters(self, out_gate, dim, num_heads, gate_window, gate_src, gate_scale)

    def forward(self, x: Tensor, value_embed: Tensor | None = None) -> Tensor:
        """x: [B, T, dim]; value_embed: [B, T, kv_dim] added to c_v(x) (shared VE layers)."""
        b, t, _ = x.shape
        q_raw = self.c_q(x)
        q = q_raw.reshape(b, t, self.num_heads, self.head_dim)
        k = self.c_k(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.c_v(x)
        if value_embed is not None:
            v = v + value_embed
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        q = self.rotary(F.rms_norm(q, (q.size(-1),)))
        k = self.rotary(F.rms_norm(k, (k.size(-1),)))
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = self.kernel(q, k, v)
        y = self.xsa(y, v)
        y = self.output_gate(self, y, x, q_raw)
        return self.proj(y.reshape(b, t, -1))
