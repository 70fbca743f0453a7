"""Newton-Schulz orthogonalisation of Muon updates: the baseline's fixed quintic and R6's
Polar-Express schedule, plus MuonEq-R's row normalisation.

Both iterations are the same odd polynomial step X <- aX + (bA + cA^2)X with A = XX^T, run in bf16
on the wide orientation of X after dividing by its Frobenius norm; they differ only in the (a, b, c)
used per iteration. Every function works on one matrix [rows, cols] or on a batch [B, rows, cols]
(norms are per matrix over the last two dims), so same-shape matrices can share one batched call.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# The baseline's quintic (PR #201 lineage): repeated every iteration, it drives the singular values
# into roughly [0.7, 1.2] rather than to 1; that is good enough for Muon and converges fast.
NS_COEFFS = (3.4445, -4.7750, 2.0315)

# Polar Express (R6, from #1344): one tuple per iteration, each the minimax-optimal quintic for the
# interval of singular values the previous iterations leave. For normalised singular values in
# [1e-3, 1] the five composed steps land in [0.859, 1.141] in exact arithmetic.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

NS_KINDS = ("standard", "polar_express")


def widened_bf16_matmul(p: Tensor, q: Tensor) -> Tensor:
    """The bf16 product ``p @ q`` as a bf16 GEMM defines it (fp32 accumulation, one rounding to bf16),
    computed in fp32: a product of two bf16 values is exact in fp32, so only the summation order can
    differ from a bf16 kernel's (measured: equal on small matrices, 2 in 10,000 outputs one bf16 ulp
    apart at 512x2048x512). Used on CPU, where torch's bf16 GEMM takes a scalar fallback for
    contiguous operands: one Polar-Express call on a 512x2048 matrix took 10.9 s there against
    0.11 s in fp32 on a 2-core AVX2 machine, and 6 CPU steps of the full-size pr1855 model 1,253 s
    instead of 72.9 s (2026-12-07)."""
    return (p.float() @ q.float()).bfloat16()


def orthogonalise(grad: Tensor, coeffs, eps: float = 1e-7) -> Tensor:
    """Run X <- aX + (bA + cA^2)X, A = XX^T, for each (a, b, c) in ``coeffs``, in bf16, on the wide
    orientation of ``grad`` / (||grad||_F + eps) (norm per matrix); returns bf16, shape of grad.
    Every intermediate is rounded to bf16 as on CUDA; on CPU the products are formed in fp32
    (``widened_bf16_matmul``)."""
    mm = widened_bf16_matmul if grad.device.type == "cpu" else torch.matmul
    x = grad.bfloat16()
    # A 2-D matrix keeps the scripts' whole-tensor norm call (bit-identical to PR #89 on any device).
    norm = x.norm() if x.ndim == 2 else x.norm(dim=(-2, -1), keepdim=True)
    x = x / (norm + eps)
    transposed = grad.size(-2) > grad.size(-1)
    if transposed:
        x = x.mT
    for a, b, c in coeffs:
        gram = mm(x, x.mT)
        poly = b * gram + mm(c * gram, gram)  # (c A) A, as the scripts' ``c * A @ A`` parses
        x = a * x + mm(poly, x)
    return x.mT if transposed else x


def newton_schulz5(grad: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """The baseline orthogonaliser: ``steps`` iterations of the fixed NS_COEFFS quintic."""
    return orthogonalise(grad, (NS_COEFFS,) * steps, eps)


def polar_express(grad: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Polar-Express orthogonaliser: the first ``steps`` tuples of POLAR_EXPRESS_COEFFS.

    More than five steps still run exactly five, as R6/R7 do (their comment says the last tuple
    repeats; their code does not), so ``muon_backend_steps`` > 5 changes nothing here."""
    return orthogonalise(grad, POLAR_EXPRESS_COEFFS[:steps], eps)


def row_normalize(update: Tensor, eps: float = 1e-7) -> Tensor:
    """MuonEq-R (R4, from #1217): divide each row (last dim) by max(||row||_2, eps), the norm taken
    in fp32. Done before NS, it equalises the rows' share of the update that NS then spreads out."""
    x = update.float()
    return (x / x.norm(dim=-1, keepdim=True).clamp_min(eps)).to(update.dtype)


# torch.compile swaps these for compiled versions on CUDA (see pgolf.train.setup); Muon looks the
# function up at every step, so a swap after the optimizer is built still takes effect.
_ns_impls: dict[str, Callable[..., Tensor]] = {"standard": newton_schulz5, "polar_express": polar_express}


def set_newton_schulz_impl(fn: Callable[..., Tensor], kind: str = "standard") -> None:
    """Replace the orthogonaliser used for ``kind`` (e.g. by ``torch.compile(polar_express)``)."""
    assert kind in _ns_impls, kind
    _ns_impls[kind] = fn


def newton_schulz_impl(kind: str = "standard") -> Callable[..., Tensor]:
    return _ns_impls[kind]
