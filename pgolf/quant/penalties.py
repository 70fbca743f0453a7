"""Quantisation-friendliness penalties added to the training loss (issue 16 experiment switches,
off in every preset): ``quant.kure_weight`` and ``quant.r2_weight``, on the block matrices
(``pgolf.model.export_view.is_block_matrix``: the int6/int8 per-row quantised linears).

* KURE (Shkolnik et al. 2020): for each matrix W with elements w (mean mu, population std s),
  kurt(W) = mean(((w - mu) / s)^4); the penalty is mean_W (kurt(W) - 1.8)^2, pulling each
  matrix towards the kurtosis of a uniform distribution (1.8), which a uniform grid fits best.
  A constant matrix (a zero-initialised projection at step 0) contributes 0, never a NaN.
* R2 (range regularisation, L-infinity form, Kundu et al. 2023), per row as pgolf's quantisers
  scale per row: r2(W) = mean_i max_j |W_ij|; the penalty is mean_W r2(W), shrinking the outliers
  that set each row's quantisation step.

  loss = task loss + kure_weight * KURE + r2_weight * R2

Both are plain differentiable torch functions (autograd gives their gradients); the trainer adds
them once per optimizer step, to the last micro-batch's loss, so DDP averages identical gradients.
With both weights 0 nothing is built and the loss is unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

UNIFORM_KURTOSIS = 1.8


def _at_least_fp32(w: Tensor) -> Tensor:
    return w.to(torch.promote_types(w.dtype, torch.float32))


def kurtosis(w: Tensor) -> Tensor:
    """mean(((w - mu) / s)^4) over all elements; NaN-free: a constant matrix (s = 0) gives 0."""
    x = _at_least_fp32(w).reshape(-1)
    mu = x.mean()
    var = (x - mu).square().mean()
    safe = torch.where(var > 0, var, torch.ones_like(var))
    return (x - mu).pow(4).mean() / safe.square()


def kure_penalty(mats: list[Tensor], target: float = UNIFORM_KURTOSIS) -> Tensor:
    """mean over matrices of (kurt(W) - target)^2; a constant matrix (the zero-initialised output
    projections at step 0) contributes 0 and no gradient."""
    terms = []
    for w in mats:
        k = kurtosis(w)
        terms.append(torch.where(k > 0, (k - target).square(), torch.zeros_like(k)))
    return torch.stack(terms).mean()


def r2_penalty(mats: list[Tensor]) -> Tensor:
    return torch.stack([_at_least_fp32(w).abs().amax(dim=1).mean() for w in mats]).mean()


def block_matrices(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    from pgolf.model.export_view import is_block_matrix

    return [(n, p) for n, p in model.named_parameters() if p.ndim == 2 and is_block_matrix(n)]


def build_weight_penalty(qcfg, model: nn.Module) -> Callable[[], Tensor] | None:
    """The penalty of ``quant.kure_weight`` / ``quant.r2_weight`` over ``model``'s block matrices,
    as a function of no arguments (reads the live weights), or None when both weights are 0."""
    kw, rw = float(qcfg.kure_weight), float(qcfg.r2_weight)
    if kw == 0 and rw == 0:
        return None
    mats = [p for _, p in block_matrices(model)]
    terms: list[Callable[[], Tensor]] = []
    if kw:
        terms.append(lambda: kw * kure_penalty(mats))
    if rw:
        terms.append(lambda: rw * r2_penalty(mats))
    return lambda: sum(term() for term in terms)
