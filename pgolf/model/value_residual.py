"""Value residual learning (``model.value_residual``; issue 16, off in every preset; ResFormer).

The first block's attention values v_1 (after ``c_v`` and any value embedding, before the heads
split) are kept for this forward; every later block mixes its own values with them by a learned
pair ``blocks.{i}.attn.vr_lambda`` = (l_self, l_first), init (0.5, 0.5):

  v_i <- l_self * v_i + l_first * v_1        (i >= 1; block 0 is unchanged)

Each attention holds a plain function chosen at build time (``value_mix``: keep, store or mix),
so the forward has no branch; the first values travel through a :class:`FirstValues` holder shared
by the model's attention modules (like the document attention's ids), which is not a module and
holds no state-dict entry. The virtual layer list always starts with block 0; with layer loops,
block 0 must not repeat (``model.loop_start >= 1``, checked by the config).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

VR_LAMBDA_INIT = (0.5, 0.5)


class FirstValues:
    """The first block's values of the current forward, shared by every attention of one model."""

    def __init__(self) -> None:
        self.v: Tensor | None = None


def keep_values(attn: nn.Module, v: Tensor) -> Tensor:
    """``CausalSelfAttention.value_mix`` when value residual learning is off."""
    return v


def store_first_values(attn: nn.Module, v: Tensor) -> Tensor:
    attn.first_values.v = v
    return v


def mix_first_values(attn: nn.Module, v: Tensor) -> Tensor:
    lam = attn.vr_lambda.to(v.dtype)
    return lam[0] * v + lam[1] * attn.first_values.v


def attach_value_residual(blocks: nn.ModuleList) -> None:
    """Give block 0 the storing mix and every later block a ``vr_lambda`` and the mixing one."""
    holder = FirstValues()
    for i, block in enumerate(blocks):
        attn = block.attn
        attn.first_values = holder
        if i == 0:
            attn.value_mix = store_first_values
        else:
            attn.vr_lambda = nn.Parameter(torch.tensor(VR_LAMBDA_INIT, dtype=torch.float32))
            attn.value_mix = mix_first_values
