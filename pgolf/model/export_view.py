"""Training-time switches whose tensors or parameterisation the artifact does not carry (issue 16):

* ``model.mtp_heads``: the ``mtp_heads.*`` tensors are training-only and dropped;
* ``model.tanh_reparam`` = a > 0: every block matrix W is used as W_eff = a * tanh(W / a)
  (``TanhReparam``, the ``weight_transform`` of its ``CastedLinear``), so |W_eff| < a always;
  the artifact stores W_eff, and the exported model is a plain one.

:func:`artifact_view` turns a training state dict and config into the exported pair; the
artifact's model config is ``ModelConfig.export_config()`` (both switches off), so a reloaded
artifact builds the plain model and its evaluation equals the trained model's own ``token_nll``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pgolf.model.config import ModelConfig, is_control_tensor
from pgolf.model.layers import CastedLinear, Passthrough
from pgolf.model.mtp import MTP_PREFIX


class TanhReparam(nn.Module):
    """W -> a * tanh(W / a): bounded by a, the identity for |W| << a."""

    def __init__(self, bound: float):
        super().__init__()
        self.bound = float(bound)

    def forward(self, w: Tensor) -> Tensor:
        return tanh_bound(w, self.bound)

    def extra_repr(self) -> str:
        return f"bound={self.bound:g}"


def tanh_bound(w: Tensor, a: float) -> Tensor:
    return a * torch.tanh(w / a)


def is_block_matrix(name: str) -> bool:
    """The block matrices, by state-dict name: every linear weight except the control tensors
    (gates), the embeddings, an untied head and the MTP heads. The tanh reparameterisation covers
    these, and the KURE / R2 penalties (pgolf.quant.penalties) read them."""
    return (
        name.endswith(".weight")
        and not is_control_tensor(name)
        and not name.startswith(("tok_emb.", "lm_head.", MTP_PREFIX))
        and not name.endswith("embed.weight")
    )


def attach_tanh_reparam(model: nn.Module, bound: float) -> list[str]:
    """Set ``TanhReparam(bound)`` as the weight transform of every covered ``CastedLinear``."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, CastedLinear) and is_block_matrix(f"{name}.weight"):
            assert isinstance(module.weight_transform, Passthrough), f"{name} already has a weight transform"
            module.weight_transform = TanhReparam(bound)
            names.append(f"{name}.weight")
    return names


def artifact_view(state: dict[str, Tensor], cfg: ModelConfig) -> tuple[dict[str, Tensor], ModelConfig]:
    """(state dict, model config) of the exported model: MTP tensors dropped, tanh-reparameterised
    weights replaced by their effective values. The identity for a config without these switches."""
    out = {k: v for k, v in state.items() if not k.startswith(MTP_PREFIX)}
    if cfg.tanh_reparam > 0:
        a = cfg.tanh_reparam
        out = {k: (tanh_bound(v.to(torch.promote_types(v.dtype, torch.float32)), a).to(v.dtype) if v.ndim == 2 and is_block_matrix(k) else v) for k, v in out.items()}
    return out, cfg.export_config()
