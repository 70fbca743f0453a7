"""Storage formats and per-row integer quantisation.

A format string is ``fp32`` / ``fp16`` / ``bf16`` (float passthrough) or
``int<N>[:<clip>][:<grid>][:<rounding>]``: N-bit integers with one scale per row (per tensor for
1-D).

* clip ``q``: the row's 0.9999984 quantile of |w| (the submissions' "percentile" clip, computed
  bit for bit as their ``torch.quantile``; with <= 1536 entries per row this is essentially the row
  max); ``max``: the row max; ``search``: per row, the candidate clip (a ladder of quantiles) with
  the smallest squared error; ``sd``: SDClip (R4+), k times the row's standard deviation (unbiased,
  of the unquantised row), with k given by the caller (``quant.sdclip_k_*`` by tensor group) and
  the records' floor 1e-10 on the scale (``scale_floor`` does not apply), so that
  s = max(k * std / qmax, 1e-10).
* floor option ``nofloor``: the scale floor is 1e-10 / qmax (the records' quant-gate rule
  s = max(max|w_row|, 1e-10) / 127) instead of ``scale_floor``.
* grid ``sym``: q in [-(2^(N-1)-1), 2^(N-1)-1]; ``full``: q in [-2^(N-1), 2^(N-1)-1].
* scale s = max(clip / qmax, floor) in fp32, stored rounded to the scale dtype (fp16 by default).
* rounding: which scale the values are divided by, q = clamp(round(clamp(w, +-clip) / s'), qmin,
  qmax). ``stored`` (the default): s' = the *stored* (fp16-rounded) scale, so q is the nearest
  grid point and dequantisation (q * s_stored) reproduces exactly what the quantiser measured;
  also PR #162/#198/#201/#401's int6 rule. ``fp32div``: s' = the fp32 scale *before* it is rounded
  for storage, as the baseline's int8 quantiser, PR #89's int6 one and #201/#401's int8 one do:
  some values (measured: 0.001-0.4%, most for int8 rows above the scale floor) then land one step
  from the nearest grid point, so its squared error is never lower on values inside the clip
  (+0.0001% to +0.05% MSE on Gaussian and Student-t matrices). Dequantisation is q * s_stored
  under both rules; only ``fp32div`` is written into the spec (``int8:q:sym:fp32div``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

FLOAT_FORMATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CLIP_RULES = ("q", "max", "search", "sd")
FLOOR_OPTIONS = ("nofloor",)
SD_FLOOR = 1e-10  # SDClip's scale floor (the records' max(k * std / c, 1e-10))
GRIDS = ("sym", "full")
ROUNDINGS = ("stored", "fp32div")  # divide by the stored scale | by the fp32 scale (the scripts' rule)
# Candidate clip quantiles for the per-row search ("GPTQ-lite" as the record described it).
SEARCH_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)


@dataclass(frozen=True)
class Format:
    kind: str  # "float" | "int"
    float_dtype: torch.dtype | None = None
    bits: int = 0
    clip: str = "q"
    grid: str = "sym"
    rounding: str = "stored"
    nofloor: bool = False

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def qmin(self) -> int:
        return -self.qmax - (1 if self.grid == "full" else 0)

    def spec(self) -> str:
        if self.kind == "float":
            return next(k for k, v in FLOAT_FORMATS.items() if v == self.float_dtype)
        base = f"int{self.bits}:{self.clip}:{self.grid}"
        base = base if self.rounding == "stored" else f"{base}:{self.rounding}"
        return f"{base}:nofloor" if self.nofloor else base


def parse_format(spec: str) -> Format:
    """Parse a format string; ValueError with the accepted grammar on anything else."""
    spec = spec.strip().lower()
    if spec in FLOAT_FORMATS:
        return Format("float", float_dtype=FLOAT_FORMATS[spec])
    parts = spec.split(":")
    head = parts[0]
    grammar = "expected fp32, fp16, bf16 or int<N>[:q|max|search|sd][:sym|full][:stored|fp32div][:nofloor] with N in 2..8"
    if not head.startswith("int") or not head[3:].isdigit():
        raise ValueError(f"unknown format {spec!r}: {grammar}")
    bits = int(head[3:])
    if not 2 <= bits <= 8:
        raise ValueError(f"format {spec!r}: N must be in 2..8 ({grammar})")
    clip, grid, rounding, nofloor = "q", "sym", "stored", False
    for part in parts[1:]:
        if part in CLIP_RULES:
            clip = part
        elif part in GRIDS:
            grid = part
        elif part in ROUNDINGS:
            rounding = part
        elif part in FLOOR_OPTIONS:
            nofloor = True
        else:
            raise ValueError(f"format {spec!r}: unknown option {part!r} ({grammar})")
    return Format("int", bits=bits, clip=clip, grid=grid, rounding=rounding, nofloor=nofloor)


def quantile_rank(q: float, n: int) -> tuple[int, int, float]:
    """torch.quantile's rank arithmetic for ``n`` sorted entries: q rounded to fp32, rank =
    q * (n - 1) in fp32; returns (index below, index above, interpolation weight). Done in Python
    (exact fp32 emulation) so that QAT's compiled forward sees constants."""
    rank = np.float32(q) * np.float32(n - 1)
    lo = int(np.floor(rank))
    return lo, int(np.ceil(rank)), float(rank - np.float32(lo))  # the difference is exact in fp32


def row_quantile(abs_rows: Tensor, q: float) -> Tensor:
    """Per-row linear-interpolated quantile of a 2-D tensor, bit for bit ``torch.quantile(x, q,
    dim=1)`` (its fp32 rank and ``lerp``; the submissions' clips), without its size limit. q = 1
    gives the row max. A quantile in the top few entries of a row (the submissions' 0.9999984 on
    rows of <= 1536 entries) only needs ``topk``, not a full sort: QAT calls this in every forward."""
    n = abs_rows.size(1)
    if q >= 1.0 or n == 1:
        return abs_rows.amax(dim=1)
    lo, hi, weight = quantile_rank(q, n)
    k = n - lo  # entries from position lo to the end (ascending order)
    if k <= 16:
        top = abs_rows.topk(k, dim=1).values  # descending: index n-1-j holds ascending position j
        lo_v, hi_v = top[:, n - 1 - lo], top[:, n - 1 - hi]
    else:
        sorted_rows = abs_rows.sort(dim=1).values
        lo_v, hi_v = sorted_rows[:, lo], sorted_rows[:, hi]
    return torch.lerp(lo_v, hi_v, weight)


def _scale_floor(fmt: Format, scale_floor: float) -> float:
    if fmt.clip == "sd":
        return SD_FLOOR
    if fmt.nofloor:
        return SD_FLOOR / fmt.qmax
    if scale_floor < 0:
        return 1.0 / fmt.qmax
    return max(scale_floor, 1e-12)


def _smallest_positive(dtype: torch.dtype) -> float:
    """The smallest positive value of a float dtype (subnormal included): a stored scale is never
    0, so ``w / s`` is always finite (fp16 turns the 1e-12 guard into 0)."""
    info = torch.finfo(dtype)
    return float(info.smallest_normal * info.eps)


def round_to_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Round positive finite fp32 values to the nearest ``dtype`` value (ties to even, subnormals
    included), computed in fp32 arithmetic. Equal to ``x.to(dtype).float()``, but torch.compile
    (inductor) folds that cast pair into a no-op, which silently gave QAT a different grid from the
    export; arithmetic cannot be folded."""
    if dtype == torch.float32:
        return x
    info = torch.finfo(dtype)
    precision = 1 - int(math.log2(info.eps))  # significant bits: 11 (fp16), 8 (bf16)
    min_quantum = int(math.log2(info.smallest_normal * info.eps))  # exponent of the subnormal step
    _, exponent = torch.frexp(x)  # x = m * 2^e, 0.5 <= m < 1
    quantum = torch.exp2(torch.clamp(exponent - precision, min=min_quantum).to(x.dtype))
    return (torch.round(x / quantum) * quantum).clamp_max(info.max)


def fp32_scale(clip: Tensor, fmt: Format, scale_floor: float, scale_dtype: torch.dtype) -> Tensor:
    """s = max(clip / qmax, floor) in fp32, before it is rounded for storage (kept > 0 also after
    that rounding)."""
    return (clip.float() / fmt.qmax).clamp_min(max(_scale_floor(fmt, scale_floor), _smallest_positive(scale_dtype)))


def stored_scale(clip: Tensor, fmt: Format, scale_floor: float, scale_dtype: torch.dtype) -> Tensor:
    """s = max(clip / qmax, floor) rounded to the scale dtype (and kept > 0)."""
    return round_to_dtype(fp32_scale(clip, fmt, scale_floor, scale_dtype), scale_dtype).to(scale_dtype)


def quantize_with_clip(rows: Tensor, clip: Tensor, fmt: Format, scale_floor: float, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """rows [R, C] fp32, clip [R] -> (q int8 [R, C], stored scale [R] in scale_dtype). The values
    are divided by the stored scale or, with ``fmt.rounding == "fp32div"``, by the fp32 scale (see
    the module docstring); the returned scale is the stored one either way."""
    raw = fp32_scale(clip, fmt, scale_floor, scale_dtype)
    scale = round_to_dtype(raw, scale_dtype).to(scale_dtype)
    s = (raw if fmt.rounding == "fp32div" else scale.float())[:, None]
    clipped = torch.maximum(torch.minimum(rows, clip[:, None]), -clip[:, None])
    q = torch.clamp(torch.round(clipped / s), fmt.qmin, fmt.qmax).to(torch.int8)
    return q, scale


def as_rows(w: Tensor) -> Tensor:
    """The fp32 [R, C] view that quantisation works on: rows = first dim (1-D/0-D: one row)."""
    w = w.detach().float()
    return w.reshape(w.shape[0], -1) if w.ndim >= 2 else w.reshape(1, -1)


def sd_clips(rows: Tensor, k: float, row_gain: Tensor | None = None) -> Tensor:
    """SDClip's per-row clip: k * std(row) (unbiased; 0 for a one-column row), optionally times a
    per-row gain (Hessian-aware SDClip)."""
    std = rows.std(dim=1) if rows.shape[1] > 1 else torch.zeros(rows.shape[0], dtype=rows.dtype)
    clip = k * std
    return clip if row_gain is None else clip * row_gain.to(clip)


def row_clips(
    rows: Tensor, fmt: Format, *, clip_quantile: float = 0.9999984, scale_floor: float = -1.0, scale_dtype: torch.dtype = torch.float16,
    sd_k: float | None = None, row_gain: Tensor | None = None,
) -> Tensor:
    """The per-row clip [R] of the format's clip rule. ``search`` ("GPTQ-lite" done per row, as
    PR #414's README claimed and its code did not): every candidate quantile is tried and each row
    keeps the one with the smallest squared round-trip error of *that row*. ``sd`` needs ``sd_k``
    (and takes an optional ``row_gain``, see ``sd_clips``)."""
    absw = rows.abs()
    if fmt.clip == "sd":
        if sd_k is None:
            raise ValueError(f"format {fmt.spec()}: the sd clip rule needs k (quant.sdclip_k_*)")
        return sd_clips(rows, sd_k, row_gain)
    if fmt.clip != "search":
        return row_quantile(absw, clip_quantile if fmt.clip == "q" else 1.0)
    best_clip = best_err = None
    for cq in SEARCH_QUANTILES:
        clip = row_quantile(absw, cq)
        q, s = quantize_with_clip(rows, clip, fmt, scale_floor, scale_dtype)
        err = (q.float() * s.float()[:, None] - rows).square().sum(dim=1)
        if best_err is None:
            best_clip, best_err = clip, err
        else:
            better = err < best_err  # ties keep the earlier (smaller) clip
            best_clip = torch.where(better, clip, best_clip)
            best_err = torch.where(better, err, best_err)
    return best_clip


def quantize_rows(
    w: Tensor,
    fmt: Format,
    *,
    clip_quantile: float = 0.9999984,
    scale_floor: float = -1.0,
    scale_dtype: torch.dtype = torch.float16,
    sd_k: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Quantise a tensor row-wise (a 1-D tensor is one row). Returns (q int8 with w's row layout
    [R, C], scale [R]). ``sd_k``: the k of the ``sd`` clip rule."""
    assert fmt.kind == "int"
    rows = as_rows(w)
    clip = row_clips(rows, fmt, clip_quantile=clip_quantile, scale_floor=scale_floor, scale_dtype=scale_dtype, sd_k=sd_k)
    return quantize_with_clip(rows, clip, fmt, scale_floor, scale_dtype)


def dequantize_rows(q: Tensor, scale: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Inverse of quantize_rows: q [R, C] * scale [R] reshaped to ``shape``."""
    return (q.float() * scale.float()[:, None]).reshape(shape).to(dtype)
