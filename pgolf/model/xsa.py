"""XSA, exclusive self-attention on the last N blocks (PR #287 lineage, used by PR #401)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ExclusiveSelfAttention(nn.Module):
    """XSA (Zhai 2026): remove from each head's output its component along the token's own value
    vector, y <- y - (y . v_hat) v_hat with v_hat = v / ||v||. Grouped form: the H query heads of
    one KV head are contiguous, so y [B,T,H,D] is viewed as [B,T,Hkv,H/Hkv,D] and v_hat
    broadcasts over the group without being repeated. No parameters."""

    def forward(self, y: Tensor, v: Tensor) -> Tensor:
        b, t, h, d = y.shape
        hkv = v.size(2)
        y_g = y.reshape(b, t, hkv, h // hkv, d)
        v_hat = F.normalize(v, dim=-1, eps=1e-12).unsqueeze(3)
        y_g = y_g - (y_g * v_hat).sum(dim=-1, keepdim=True) * v_hat
        return y_g.reshape(b, t, h, d)
