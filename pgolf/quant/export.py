"""State dict <-> quantised tensors, following a QuantConfig's format policy.

``quantize_state_dict`` decides one format per tensor (see ``pgolf.quant.config`` for the order of
the rules), quantises it, and returns ``QTensor`` records; ``dequantize_state_dict`` turns them
back into a state dict in each tensor's original dtype, ready for ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pgolf.errors import ArtifactError
from pgolf.quant.config import QuantConfig
from pgolf.quant.formats import FLOAT_FORMATS, dequantize_rows, parse_format, quantize_rows
from pgolf.quant.lqer import Lqer
from pgolf.quant.rotate import Rotation

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class QTensor:
    """One stored tensor. ``fmt`` is a format spec (``int6:max:full``, ``fp16``, ...) or ``raw``
    (non-float, stored as is). ``values`` is an int8 [R, C] tensor for integer formats and the
    stored-dtype tensor otherwise; ``scale`` is the per-row scale [R] for integer formats."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    fmt: str
    values: Tensor
    scale: Tensor | None = None
    lqer: "Lqer | None" = None  # low-rank correction (pgolf.quant.lqer), added at load
    rotation: "Rotation | None" = None  # quant.rotate=hadamard: values are of W Q, undone at load

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def bits(self) -> int:
        return parse_format(self.fmt).bits if self.fmt.startswith("int") else 0


def category(name: str) -> str:
    """PR #201's categories: embed (tok_emb/lm_head), mlp, attn (also any '.proj.'), other."""
    if "tok_emb" in name or "lm_head" in name:
        return "embed"
    if ".mlp." in name:
        return "mlp"
    if ".attn." in name or ".proj." in name:
        return "attn"
    return "other"


def sdclip_group(name: str) -> str:
    """The group whose k SDClip uses, by name as the records route it: tok_emb (and an untied
    lm_head) -> embed, ".mlp." -> mlp, ".attn." -> attn, anything else -> other."""
    if "tok_emb" in name or "lm_head" in name:
        return "embed"
    if ".mlp." in name:
        return "mlp"
    if ".attn." in name:
        return "attn"
    return "other"


def sdclip_k(name: str, cfg: QuantConfig) -> float:
    return float(getattr(cfg, f"sdclip_k_{sdclip_group(name)}"))


GATE_SUFFIX = ".attn_gate_w"
GATE_NUMEL = (32, 8192)  # R6/R7's bounds (the lower one was 1,024 in #1736)


def is_quant_gate(name: str, t: Tensor, cfg: QuantConfig) -> bool:
    """The records' quant-gate rule: a 2-D float ``*.attn_gate_w`` with 32..8192 elements, checked
    before the control and float-passthrough rules."""
    return (bool(cfg.gate_format) and name.endswith(GATE_SUFFIX) and t.ndim == 2 and t.is_floating_point()
            and GATE_NUMEL[0] <= t.numel() <= GATE_NUMEL[1])


def choose_format(name: str, t: Tensor, cfg: QuantConfig) -> str:
    for entry in cfg.name_formats:
        pattern, _, fmt = entry.partition("=")
        if pattern in name:
            return fmt
    if not t.is_floating_point():
        return "raw"
    if is_quant_gate(name, t, cfg):
        return cfg.gate_format
    if any(p in name for p in cfg.control_patterns):
        return cfg.control_format
    cat = category(name)
    if cat == "embed":
        return cfg.embed_format
    if t.numel() <= cfg.small_numel:
        return cfg.small_format
    return {"mlp": cfg.mlp_format, "attn": cfg.attn_format}.get(cat, cfg.other_format)


def rotation_for(name: str, t: Tensor, fmt_spec: str, cfg: QuantConfig) -> Rotation | None:
    """The rotation of a tensor under ``quant.rotate``: every non-empty 2-D float tensor stored in
    an integer format (``pgolf.quant.rotate``); None for everything else and for rotate=none."""
    if cfg.rotate != "hadamard" or fmt_spec == "raw" or t.ndim != 2 or t.numel() == 0 or not t.is_floating_point():
        return None
    if parse_format(fmt_spec).kind == "float":
        return None
    return Rotation.for_tensor(cfg.rotate_seed, name, tuple(t.shape))


def quantize_tensor(name: str, t: Tensor, fmt_spec: str, cfg: QuantConfig, hessian: Tensor | None = None) -> QTensor:
    """One tensor in the given format. With a ``hessian`` (input second moment X^T X of the linear
    that owns the weight) an integer format is quantised by GPTQ on the same per-row grid and
    scales; otherwise by rounding to nearest. Under ``quant.rotate=hadamard`` a matrix is quantised
    as W Q (and its Hessian as Q^T H Q); the record keeps the rotation and the original dtype."""
    t = t.detach().cpu()
    rotation = rotation_for(name, t, fmt_spec, cfg)
    if rotation is not None:
        if not torch.isfinite(t).all():
            raise ArtifactError(f"{name}: the weights contain NaN or inf; refusing to quantise a diverged model")
        rotated = rotation.apply(t)
        hessian = rotation.rotate_hessian(hessian) if hessian is not None else None
        qt = _quantize(name, rotated, fmt_spec, cfg, hessian)
        qt.dtype, qt.rotation = dtype_name(t.dtype), rotation
        return qt
    return _quantize(name, t, fmt_spec, cfg, hessian)


def _quantize(name: str, t: Tensor, fmt_spec: str, cfg: QuantConfig, hessian: Tensor | None) -> QTensor:
    shape = tuple(t.shape)
    if fmt_spec == "raw" or t.numel() == 0:
        return QTensor(name, shape, dtype_name(t.dtype), "raw", t.contiguous())
    fmt = parse_format(fmt_spec)
    if fmt.kind == "float":
        return QTensor(name, shape, dtype_name(t.dtype), fmt.spec(), t.to(fmt.float_dtype).contiguous())
    if not torch.isfinite(t).all():
        raise ArtifactError(f"{name}: the weights contain NaN or inf; refusing to quantise a diverged model")
    kw = dict(clip_quantile=cfg.clip_quantile, scale_floor=cfg.scale_floor, scale_dtype=FLOAT_FORMATS[cfg.scale_dtype])
    sd_k = sdclip_k(name, cfg) if fmt.clip == "sd" else None
    if hessian is not None and t.ndim == 2:
        from pgolf.quant.gptq import gptq_quantize

        q, scale = gptq_quantize(t, hessian, fmt, cfg, sd_k=sd_k)
    else:
        q, scale = quantize_rows(t, fmt, sd_k=sd_k, **kw)
    return QTensor(name, shape, dtype_name(t.dtype), fmt.spec(), q.contiguous(), scale.contiguous())


def quantize_state_dict(state_dict: dict[str, Tensor], cfg: QuantConfig, hessians: dict[str, Tensor] | None = None) -> list[QTensor]:
    """Every tensor in its ``choose_format`` format; ``hessians`` maps weight names to GPTQ
    Hessians (``pgolf.quant.gptq.collect_hessians``)."""
    hessians = hessians or {}
    qtensors = [quantize_tensor(name, t, choose_format(name, t, cfg), cfg, hessians.get(name)) for name, t in state_dict.items()]
    if cfg.lqer_top_k > 0:
        add_lqer(qtensors, state_dict, cfg)
    return qtensors


def add_lqer(qtensors: list[QTensor], state_dict: dict[str, Tensor], cfg: QuantConfig) -> list[str]:
    """Attach LQER corrections (``pgolf.quant.lqer``) to the ``cfg.lqer_top_k`` integer matrices
    with the largest ||W - W_hat||_F (quant-gates excluded); returns their names."""
    from pgolf.quant.lqer import lqer_for, select_lqer

    errors = {}
    for qt in qtensors:
        t = state_dict[qt.name]
        if qt.scale is None or len(qt.shape) != 2 or is_quant_gate(qt.name, t, cfg):
            continue
        if qt.rotation is not None:  # the correction lives in the rotated space the values are in
            t = qt.rotation.apply(t)
        errors[qt.name] = t.detach().float().cpu().reshape(qt.values.shape) - dequantize_rows(qt.values, qt.scale, qt.values.shape, torch.float32)
    chosen = select_lqer(errors, cfg.lqer_top_k)
    by_name = {qt.name: qt for qt in qtensors}
    for name in chosen:
        by_name[name].lqer = lqer_for(errors[name], cfg.lqer_rank, cfg.lqer_mode, cfg.lqer_group, cfg.lqer_factor_bits)
    return chosen


def dequantize_tensor(qt: QTensor) -> Tensor:
    if qt.rotation is not None:  # W = W_rot Q^T on the float32 dequantised values
        w_rot = _dequantize(qt, torch.float32).reshape(qt.shape)
        return qt.rotation.undo(w_rot).to(TORCH_DTYPES[qt.dtype])
    return _dequantize(qt, TORCH_DTYPES[qt.dtype])


def _dequantize(qt: QTensor, dtype: torch.dtype) -> Tensor:
    if qt.fmt == "raw":
        return qt.values.reshape(qt.shape).to(dtype)
    if qt.scale is None:
        return qt.values.reshape(qt.shape).to(dtype)
    if qt.lqer is not None:
        w = dequantize_rows(qt.values, qt.scale, qt.values.shape, torch.float32) + qt.lqer.correction()
        return w.reshape(qt.shape).to(dtype)
    return dequantize_rows(qt.values, qt.scale, qt.shape, dtype)


def dequantize_state_dict(qtensors: list[QTensor]) -> dict[str, Tensor]:
    return {qt.name: dequantize_tensor(qt) for qt in qtensors}


def roundtrip_errors(state_dict: dict[str, Tensor], qtensors: list[QTensor]) -> dict[str, dict[str, float]]:
    """Per tensor: relative RMS error and max abs error of the quantise/dequantise round trip."""
    out = {}
    for qt in qtensors:
        orig = state_dict[qt.name]
        if not orig.is_floating_point() or orig.numel() == 0:
            continue
        ref = orig.detach().float().cpu()
        err = dequantize_tensor(qt).float() - ref
        denom = ref.square().mean().sqrt().item()
        out[qt.name] = {
            "fmt": qt.fmt,
            "rel_rms": err.square().mean().sqrt().item() / denom if denom > 0 else 0.0,
            "max_abs": err.abs().max().item(),
        }
    return out
