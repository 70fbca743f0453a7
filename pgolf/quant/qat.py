"""Quantisation-aware training: straight-through fake quantisation on the same grid as the export.

A ``FakeQuantizer`` is attached as the ``weight_transform`` of every ``CastedLinear`` whose
weight the export stores as integers (``attach_qat``). While on, the matmul sees exactly the
weight the artifact will hold (``dequantize(quantize(w))``); the gradient reaches the fp32 master
weight unchanged (straight-through estimator).

* ``on`` is a registered buffer (a tensor), not a Python flag. torch.compile treats a tensor as a
  graph input, so flipping it late in training changes the compiled forward without a recompile;
  PR #401 used a class attribute, which compile constant-folded, and its late QAT never ran.
  The price: the quantised weight is computed in every forward, also while ``on`` is 0.
* The scale's rounding to fp16 is done arithmetically (``formats.round_to_dtype``): inductor
  folds ``x.to(fp16).float()`` into a no-op, which gave compiled QAT a different grid from the
  export (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pgolf.model.layers import CastedLinear
from pgolf.quant.config import QuantConfig
from pgolf.quant.export import choose_format, sdclip_k
from pgolf.quant.formats import FLOAT_FORMATS, Format, parse_format, quantize_rows


class FakeQuantizer(nn.Module):
    """Straight-through fake quantisation of one linear's weight on the export's exact grid.

    The integer grid is computed from the fp32 *master* weight (held by reference, not registered,
    so it is neither a second parameter nor a state-dict entry), with ``formats.quantize_rows``:
    the same clip rule, scale floor, scale dtype and rounding as the export (also the format's
    rounding rule: ``stored`` or ``fp32div``, the scripts' division by the unrounded scale), so
    ``forward(...) == dequantize(quantize(w))`` of the artifact, bit for bit, before the cast to the
    activation dtype. (Quantising the bf16 copy that CastedLinear passes in would move the row max
    and flip roundings of a few percent of the weights.)

    Value: ``on * w_q + (1 - on) * w``, exact for on in {0, 1}; gradient: identity to the master
    weight (straight-through), whatever ``on`` is."""

    def __init__(self, fmt: Format, qcfg: QuantConfig, enabled: bool, master: nn.Parameter | None = None, sd_k: float | None = None):
        super().__init__()
        assert fmt.kind == "int"
        self.fmt = fmt
        self.sd_k = sd_k  # the k of the sd (SDClip) clip rule, by the weight's group
        self.clip_quantile = qcfg.clip_quantile
        self.scale_floor = qcfg.scale_floor
        self.scale_dtype = FLOAT_FORMATS[qcfg.scale_dtype]
        self._master = (master,)  # a tuple: not registered as a submodule parameter
        self.register_buffer("on", torch.tensor(1.0 if enabled else 0.0), persistent=False)

    def quantized(self, w: Tensor) -> Tensor:
        """dequantize(quantize(w)) in fp32, as the export computes it."""
        with torch.no_grad():
            q, scale = quantize_rows(w, self.fmt, clip_quantile=self.clip_quantile, scale_floor=self.scale_floor, scale_dtype=self.scale_dtype,
                                     sd_k=self.sd_k)
            return (q.float() * scale.float()[:, None]).reshape(w.shape)

    def forward(self, w: Tensor) -> Tensor:
        master = self._master[0]
        src = master if master is not None else w
        w32 = src.float()
        w_q = self.quantized(w32)
        on = self.on.to(torch.float32)
        # value: w_q (on = 1) or w (on = 0), exactly; gradient flows to w32 unchanged
        out = on * w_q + (1.0 - on) * w32.detach() + (w32 - w32.detach())
        return out.to(w.dtype)

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
        fmt = parse_format(fmt_spec)
        sd_k = sdclip_k(f"{name}.weight", qcfg) if fmt.clip == "sd" else None
        fq = FakeQuantizer(fmt, qcfg, enabled=qcfg.qat == "always", master=module.weight, sd_k=sd_k)
        fq.to(module.weight.device)
        module.weight_transform = fq
        quantizers[name] = fq
    return QATController(quantizers, qcfg.qat, qcfg.qat_threshold)
