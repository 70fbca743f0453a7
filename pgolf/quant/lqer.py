"""LQER: low-rank corrections of the quantisation error of the worst tensors (R7, frontier.md 3.14).

After every integer tensor is quantised, E = W - Q*s is computed for each, the tensors are ranked
by ||E||_F and the top ``quant.lqer_top_k`` get a rank-r correction from the thin SVD
E = U S V^T: A = U[:, :r] diag(S[:r]) (rows x r), B = V^T[:r, :] (r x cols), which is the best
rank-r approximation of E (Eckart-Young). The factors are stored as integers:

* ``asym`` (R7's LQER_ASYM, used when r * cols is a multiple of the group size): A in int2
  ([-2, 1]) with one scale s_A = max|A| / 1.5; B flattened row-major into groups of
  ``quant.lqer_group`` (64) values, each with its own scale max|group| / 7.5, in int4 ([-8, 7]);
* ``sym`` (the fallback, or ``quant.lqer_mode=sym``): A and B with one scale per row,
  max|row| / (2^(bits-1) - 1), in int<bits> ([-(2^(bits-1)-1), 2^(bits-1)-1]).

Scales are fp16 and the values are divided by the stored scale (the nearest grid point). The
artifact holds the factors as typed streams of the tensor (``la``/``las``/``lb``/``lbs``, bit-packed,
see ``pgolf.quant.container``) and loading adds (q_A s_A)(q_B s_B) to the dequantised weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pgolf.quant.formats import Format

ASYM_A = Format("int", bits=2, grid="full")  # [-2, 1]
ASYM_B = Format("int", bits=4, grid="full")  # [-8, 7]
_TINY = float(torch.finfo(torch.float16).smallest_normal * torch.finfo(torch.float16).eps)  # > 0 after fp16 rounding


def sym_format(bits: int) -> Format:
    return Format("int", bits=bits, grid="sym")


@dataclass
class Lqer:
    """The integer factors of one tensor's correction. ``param`` is the asym group size or the
    sym bit width."""

    mode: str  # "asym" | "sym"
    rank: int
    param: int
    qa: Tensor  # int8 [rows, rank]
    sa: Tensor  # fp16: [1] (asym) or [rows] (sym)
    qb: Tensor  # int8 [rank, cols]
    sb: Tensor  # fp16: [rank * cols / group] (asym) or [rank] (sym)

    @property
    def formats(self) -> tuple[Format, Format]:
        return (ASYM_A, ASYM_B) if self.mode == "asym" else (sym_format(self.param), sym_format(self.param))

    def descriptor(self) -> list:
        return [self.mode, self.rank, self.param]

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A, B) in fp32, dequantised."""
        a = self.qa.float() * (self.sa.float() if self.mode == "asym" else self.sa.float()[:, None])
        if self.mode == "asym":
            b = (self.qb.float().reshape(-1, self.param) * self.sb.float()[:, None]).reshape(self.qb.shape)
        else:
            b = self.qb.float() * self.sb.float()[:, None]
        return a, b

    def correction(self) -> Tensor:
        a, b = self.factors()
        return a @ b


def svd_factors(err: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-``rank`` factors of ``err`` [R, C]: A = U_r S_r, B = V_r^T (fp32)."""
    U, S, Vh = torch.linalg.svd(err.double(), full_matrices=False)
    r = min(rank, S.numel())
    return (U[:, :r] * S[:r]).float(), Vh[:r].float()


def _fp16_scale(x: Tensor) -> Tensor:
    return x.float().clamp_min(_TINY).to(torch.float16)


def _round(x: Tensor, s: Tensor, fmt: Format) -> Tensor:
    return torch.clamp(torch.round(x / s), fmt.qmin, fmt.qmax).to(torch.int8)


def pack_factors(a: Tensor, b: Tensor, mode: str, group: int, bits: int) -> Lqer:
    """Quantise the float factors (``asym`` falls back to ``sym`` when the group does not divide
    B's size)."""
    rank = a.shape[1]
    if mode == "asym" and b.numel() % group == 0:
        sa = _fp16_scale(a.abs().max() / 1.5).reshape(1)
        qa = _round(a, sa.float(), ASYM_A)
        groups = b.reshape(-1, group)
        sb = _fp16_scale(groups.abs().amax(dim=1) / 7.5)
        qb = _round(groups, sb.float()[:, None], ASYM_B).reshape(b.shape)
        return Lqer("asym", rank, group, qa.contiguous(), sa, qb.contiguous(), sb)
    fmt = sym_format(bits)
    sa = _fp16_scale(a.abs().amax(dim=1) / fmt.qmax)
    sb = _fp16_scale(b.abs().amax(dim=1) / fmt.qmax)
    return Lqer("sym", rank, bits, _round(a, sa.float()[:, None], fmt).contiguous(), sa,
                _round(b, sb.float()[:, None], fmt).contiguous(), sb)


def lqer_for(err: Tensor, rank: int, mode: str, group: int, bits: int) -> Lqer:
    a, b = svd_factors(err, rank)
    return pack_factors(a, b, mode, group, bits)


def check_lqer(lq: Lqer, rows: int, cols: int) -> None:
    """Shapes, grids and scales of decoded factors; ValueError on anything malformed."""
    if lq.mode not in ("asym", "sym") or not 1 <= lq.rank <= min(rows, cols):
        raise ValueError(f"LQER: bad mode/rank {lq.mode!r}/{lq.rank} for a {rows}x{cols} tensor")
    if tuple(lq.qa.shape) != (rows, lq.rank) or tuple(lq.qb.shape) != (lq.rank, cols):
        raise ValueError(f"LQER: factor shapes {tuple(lq.qa.shape)}, {tuple(lq.qb.shape)} do not match rank {lq.rank} of {rows}x{cols}")
    if lq.mode == "asym":
        if lq.param <= 0 or (lq.rank * cols) % lq.param:
            raise ValueError(f"LQER: group {lq.param} does not divide the {lq.rank}x{cols} factor")
        want_sa, want_sb = 1, lq.rank * cols // lq.param
    else:
        if not 2 <= lq.param <= 8:
            raise ValueError(f"LQER: sym factor bits {lq.param} outside 2..8")
        want_sa, want_sb = rows, lq.rank
    if lq.sa.numel() != want_sa or lq.sb.numel() != want_sb:
        raise ValueError(f"LQER: {lq.sa.numel()}/{lq.sb.numel()} scales, the {lq.mode} layout needs {want_sa}/{want_sb}")
    for what, s in (("A", lq.sa), ("B", lq.sb)):
        if not (torch.isfinite(s.float()).all() and (s.float() > 0).all()):
            raise ValueError(f"LQER: {what} scales must be finite and positive")
    fa, fb = lq.formats
    for what, q, fmt in (("A", lq.qa, fa), ("B", lq.qb, fb)):
        if q.numel() and (int(q.min()) < fmt.qmin or int(q.max()) > fmt.qmax):
            raise ValueError(f"LQER: {what} values outside [{fmt.qmin}, {fmt.qmax}]")


def select_lqer(errors: dict[str, Tensor], top_k: int) -> list[str]:
    """Names of the ``top_k`` tensors with the largest ||E||_F (ties: name order)."""
    norms = sorted(((-float(e.double().norm()), n) for n, e in errors.items()))
    return [n for _, n in norms[:top_k]]
