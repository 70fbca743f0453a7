"""Quantisation-aware training: straight-through fake quantisation on the same grid as the export.

A ``FakeQuantizer`` is attached as the ``weight_transform`` of every ``CastedLinear`` whose
weight the export stores as integers. Its forward is ``w + on * (q(w) - w).detach()``: the value
seen by the matmul is the quantised weight while ``on`` = 1, the gradient flows to w unchanged.

``on`` is a registered buffer (a tensor), not a Python flag. torch.compile treats a tensor as a
graph input, so flipping it late in training changes the compiled forward without a recompile;
PR #401 used a class attribute, which compile constant-folded, and its late QAT never ran.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pgolf.model.layers import CastedLinear
from pgolf.quant.config import QuantConfig
from pgolf.quant.export import choose_format
from pgolf.quant.formats import FLOAT_FORMATS, Format, parse_format, quantize_rows


class FakeQuantizer(nn.Module):
    def __init__(self, fmt: Format, qcfg: QuantConfig, enabled: bool):
        super().__init__()
        assert fmt.kind == "int"
        self.fmt = fmt
        self.clip_quantile = qcfg.clip_quantile
        self.scale_floor = qcfg.scale_floor
        self.scale_dtype = FLOAT_FORMATS[qcfg.scale_dtype]
        self.register_buffer("on", torch.tensor(1.0 if enabled else 0.0), persistent=False)

    def forward(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            q, scale = quantize_rows(
                w, self.fmt, clip_quantile=self.clip_quantile, scale_floor=self.scale_floor, scale_dtype=self.scale_dtype
            )
            w_q = (q.to(w.dtype) * scale.to(w.dtype)[:, None]).reshape(w.shape)
        return w + self.on.to(w.dtype) * (w_q - w).detach()

    def extra_repr(self) -> str:
        return f"fmt={self.fmt.spec()}"


class QATController:
    """Owns the fake quantisers of a model; ``update`` switches them on at the late threshold."""

    def __init__(self, quantizers: dict[str, FakeQuantizer], mode: str, threshold: float):
        self.quantizers = quantizers
        self.mode = mode
        self.threshold = threshold
        self.active = mode == "always"

    def set_active(self, active: bool) -> None:
        self.active = active
        for fq in self.quantizers.values():
            fq.on.fill_(1.0 if active else 0.0)

    def update(self, lr_scale: float, step: int) -> str | None:
        """Late mode: switch on the first time the LR scale drops below the threshold."""
        if self.mode == "late" and not self.active and lr_scale < self.threshold:
            self.set_active(True)
            return f"late_qat:enabled step:{step} scale:{lr_scale:.4f}"
        return None


def attach_qat(model: nn.Module, qcfg: QuantConfig) -> QATController | None:
    """Attach fake quantisers to every linear whose export format is an integer format."""
    if qcfg.qat == "off":
        return None
    quantizers: dict[str, FakeQuantizer] = {}
    for name, module in model.named_modules():
        if not isinstance(module, CastedLinear):
            continue
        fmt_spec = choose_format(f"{name}.weight", module.weight, qcfg)
        if fmt_spec == "raw" or not fmt_spec.startswith("int"):
            continue
        fq = FakeQuantizer(parse_format(fmt_spec), qcfg, enabled=qcfg.qat == "always")
        fq.to(module.weight.device)
        module.weight_transform = fq
        quantizers[name] = fq
    return QATController(quantizers, qcfg.qat, qcfg.qat_threshold)
