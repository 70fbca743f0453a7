"""BigramHash (PR #162 lineage, used by PR #201/#401): a hashed (previous, current) token-pair
embedding added to the token embedding before the embedding RMSNorm."""

from __future__ import annotations

import torch
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
