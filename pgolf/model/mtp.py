"""Multi-token prediction heads (``model.mtp_heads``, ``model.mtp_weight``; issue 16, off in every
preset), as in the PR #201/#401 scripts.

Head k (k = 0..N-1, ``mtp_heads.{k}.weight``, [vocab, model_dim], zero at init) reads position t's
final-normed hidden state and predicts the token at t + 2 + k, i.e. ``targets[:, t + 1 + k]``:

  loss = CE_main + mtp_weight * mean_k CE(softcap(head_k(h[:, :T-1-k])), targets[:, 1+k:])

Only ``GPT.forward`` (the training loss) adds this term; ``token_nll`` (every evaluation) never
reads the heads, and the heads are training-only tensors: ``pgolf.model.export_view`` drops them
from the exported state dict and the artifact's model config has ``mtp_heads = 0``. A head that
would see no position (T <= 1 + k) is skipped, as in the scripts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.layers import CastedLinear

# State-dict prefix of the training-only MTP tensors (never exported).
MTP_PREFIX = "mtp_heads."


class MTPHeads(nn.ModuleList):
    """``GPT.mtp_heads`` (a list, so the names are ``mtp_heads.{k}.weight``): called as
    ``heads(main_loss, hidden, targets, softcap)``, returns the main loss plus the weighted MTP term.
    When the switch is off ``GPT.mtp_heads`` is a ``Passthrough`` (returns the main loss)."""

    def __init__(self, num_heads: int, dim: int, vocab_size: int, weight: float):
        super().__init__([CastedLinear(dim, vocab_size, zero_init=True) for _ in range(num_heads)])
        self.weight = float(weight)

    def forward(self, main_loss: Tensor, hidden: Tensor, targets: Tensor, softcap: float) -> Tensor:
        t = hidden.size(1)
        losses = []
        for k, head in enumerate(self):
            valid = t - (k + 1)
            if valid <= 0:
                continue
            logits = head(hidden[:, :valid])
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # CE in (at least) fp32
            logits = softcap * torch.tanh(logits / softcap)
            losses.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets[:, k + 1 :].reshape(-1)))
        if not losses:
            return main_loss
        return main_loss + self.weight * (torch.stack(losses).sum() / len(losses))
