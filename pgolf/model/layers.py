"""Small building blocks shared by the model: norms, the fp32-master linear, rotary embeddings.

Tensor layout inside attention is [B, T, H, D] (batch, time, heads, head_dim), the layout of
FlashAttention 3, so that XSA's grouped reshape is free.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Passthrough(nn.Module):
    """Stands in for a switched-off part: returns its first argument, ignores the rest."""

    def forward(self, x: Tensor, *unused: object) -> Tensor:
        return x


class RMSNorm(nn.Module):
    """Parameter-free RMSNorm over the last dim (eps = the dtype's machine epsilon, F.rms_norm's
    default), optionally times a constant (LN scale 1/sqrt(layer+1), baked in at build time)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        y = F.rms_norm(x, (x.size(-1),))
        return y * self.scale if self.scale != 1.0 else y

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4f}" if self.scale != 1.0 else ""


class CastedLinear(nn.Linear):
    """Linear layer without bias whose weight stays fp32 (optimizer quality) and is cast to the
    activation dtype at matmul time. ``weight_transform`` is the fake-quantiser of QAT when one is
    attached (see ``pgolf.quant.qat``), otherwise a passthrough, decided at build time."""

    def __init__(self, in_features: int, out_features: int, *, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        # Marked for init_weights: output projections start at zero so every block is the
        # identity on the residual stream at step 0.
        self.zero_init = zero_init
        self.weight_transform: nn.Module = Passthrough()

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight_transform(self.weight.to(x.dtype))
        return F.linear(x, w)


class Rotary(nn.Module):
    """Rotary position embedding on the first ``rope_dims`` dims of each head.

    Half-split convention inside the rotated block: dim i pairs with dim i + rope_dims/2, and
    (x1, x2) -> (x1 cos + x2 sin, -x1 sin + x2 cos). Dims >= rope_dims pass through unchanged
    (partial RoPE). inv_freq_i = base^(-2i/rope_dims). cos/sin have shape [1, T, 1, rope_dims/2]
    for the [B, T, H, D] layout; they are recomputed per call (T x rope_dims/2 values, negligible),
    which keeps the module free of Python-side caches that torch.compile would have to guard.

    ``ntk_train_len`` > 0 is the rule of the PR #201/#401 and R1-R3 scripts: for a sequence of
    T > ntk_train_len tokens the base is base * (T / ntk_train_len)^(r / (r - 2)), r = rope_dims,
    decided per call (T is static under torch.compile), so a model evaluated at another length
    than it trained at uses the base the script would use at that length.
    """

    def __init__(self, rope_dims: int, base: float, ntk_train_len: int = 0):
        super().__init__()
        assert rope_dims % 2 == 0
        self.rope_dims = rope_dims
        self.base = float(base)
        self.ntk_train_len = int(ntk_train_len)
        self.register_buffer("inv_freq", self.inverse_frequencies(self.base), persistent=False)

    def inverse_frequencies(self, base: float, device: torch.device | None = None) -> Tensor:
        exponents = torch.arange(0, self.rope_dims, 2, dtype=torch.float32, device=device) / self.rope_dims
        return 1.0 / (base**exponents)

    def base_for(self, seq_len: int) -> float:
        if self.ntk_train_len > 0 and seq_len > self.ntk_train_len:
            r = self.rope_dims
            return self.base * (seq_len / self.ntk_train_len) ** (r / (r - 2))
        return self.base

    def tables(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        base = self.base_for(seq_len)
        inv_freq = self.inv_freq if base == self.base else self.inverse_frequencies(base, self.inv_freq.device)
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.to(device=device, dtype=torch.float32))
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, T, H, D] -> same shape, first rope_dims of D rotated by position."""
        cos, sin = self.tables(x.size(1), x.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        r, half = self.rope_dims, self.rope_dims // 2
        x1, x2 = x[..., :half], x[..., half:r]
        rotated = torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), dim=-1)
        if r == x.size(-1):
            return rotated
        return torch.cat((rotated, x[..., r:]), dim=-1)
