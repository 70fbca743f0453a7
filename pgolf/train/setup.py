"""Device-dependent choices, made once: precision, autocast, compile, kernels.

CUDA follows the submissions: the model is cast to bf16, every ``CastedLinear`` back to fp32
(fp32 master weights, bf16 matmuls under autocast), every parameter with ndim < 2 or a control
name back to fp32; embedding tables stay bf16. TF32 is on, the forward is compiled with
``fullgraph=True, dynamic=False`` and the Newton-Schulz function is compiled separately.
CPU runs in fp32 without compile by default (both switchable in ``[train]``).
"""

from __future__ import annotations

import torch
from torch import nn

from pgolf.model.config import is_control_tensor
from pgolf.model.layers import CastedLinear
from pgolf.train.config import TrainConfig


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def use_compile(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")


def apply_precision(model: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """bf16 embedding tables on CUDA (as the scripts), fp32 for everything else."""
    embed_bf16 = cfg.embed_dtype == "bf16" or (cfg.embed_dtype == "auto" and device.type == "cuda")
    if not embed_bf16:
        model.float()
        return
    model.bfloat16()
    for module in model.modules():
        if isinstance(module, CastedLinear):
            module.float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (p.ndim < 2 or is_control_tensor(name)) and p.dtype != torch.float32:
                p.data = p.data.float()
        for name, b in model.named_buffers():
            if b.is_floating_point() and b.dtype != torch.float32:
                b.data = b.data.float()


def configure_backends(device: torch.device, threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    if not enabled:
        return model
    from pgolf.optim import newton_schulz

    newton_schulz.set_newton_schulz_impl(torch.compile(newton_schulz.newton_schulz5), "standard")
    newton_schulz.set_newton_schulz_impl(torch.compile(newton_schulz.polar_express), "polar_express")
    return torch.compile(model, dynamic=False, fullgraph=True)
