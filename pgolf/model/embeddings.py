"""Input-side extras of the record stacks: SmearGate, BigramHash and the shared value embedding.

Each is a module that the GPT builds only when its config asks for it; when off, a Passthrough
(or nothing) stands in, so the forward pass has no technique switches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.layers import CastedLinear

BIGRAM_MUL_CUR = 36313
BIGRAM_MUL_PREV = 27191


def bigram_bucket_ids(ids: Tensor, buckets: int, bos_id: int | None = None) -> Tensor:
    """Hash of (previous, current) token per position, computed in int32.

    Position 0 of every row gets the reserved bucket ``buckets - 1``; position i >= 1 gets
    ((36313 * t_i) XOR (27191 * t_{i-1})) mod (buckets - 1), so real pairs never land in the
    reserved bucket. With ``bos_id`` (document-aware mode) a BOS position also gets the reserved
    bucket, so no pair crosses a document boundary.
    """
    reserved = buckets - 1
    t = ids.to(torch.int32)
    pair = torch.bitwise_xor(BIGRAM_MUL_CUR * t[:, 1:], BIGRAM_MUL_PREV * t[:, :-1]) % reserved
    if bos_id is not None:
        pair = torch.where(t[:, 1:] == bos_id, torch.full_like(pair, reserved), pair)
    first = torch.full_like(t[:, :1], reserved)
    return torch.cat((first, pair), dim=1).long()


class BigramHash(nn.Module):
    """Hashed bigram embedding added to the token embedding before the embedding RMSNorm:
    out = scale * proj(embed[hash(prev, cur)]). ``proj`` exists only when bigram_dim != model_dim."""

    def __init__(self, buckets: int, bigram_dim: int, model_dim: int, scale_init: float, bos_id: int | None):
        super().__init__()
        self.buckets = buckets
        self.bos_id = bos_id
        self.embed = nn.Embedding(buckets, bigram_dim)
        self.proj: nn.Module = CastedLinear(bigram_dim, model_dim) if bigram_dim != model_dim else nn.Identity()
        self.scale = nn.Parameter(torch.tensor(scale_init, dtype=torch.float32))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        h = self.embed(bigram_bucket_ids(ids, self.buckets, self.bos_id))
        return x + self.scale.to(x.dtype) * self.proj(h.to(x.dtype))


class SmearGate(nn.Module):
    """out_t = (1 - g) * x_t + g * x_{t-1}, g = sigmoid(gate) per channel, x_{-1} = 0.

    The gate starts at zero (g = 0.5). In document-aware mode the gate is zero at BOS positions,
    so a document's BOS never absorbs the previous document's last token.
    """

    def __init__(self, dim: int, bos_id: int | None):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim, dtype=torch.float32))
        self.bos_id = bos_id

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate).to(x.dtype)[None, None, :]
        if self.bos_id is not None:
            g = g * (ids != self.bos_id).unsqueeze(-1).to(x.dtype)
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        return (1 - g) * x + g * prev


class SharedValueEmbedding(nn.Module):
    """One table (vocab x ve_dim) projected to kv_dim and scaled, computed once per forward and
    added to the value projection of the chosen blocks, each with its own learned scale."""

    def __init__(self, vocab_size: int, ve_dim: int, kv_dim: int, scale_init: float):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, ve_dim)
        self.proj = CastedLinear(ve_dim, kv_dim)
        self.scale = nn.Parameter(torch.tensor(scale_init, dtype=torch.float32))

    def forward(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        return self.scale.to(dtype) * self.proj(self.embed(ids).to(dtype))
