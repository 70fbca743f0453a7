"""GPTQ: integer values chosen with second-order error compensation, on the export's own grid.

For a linear layer y = x W^T, rounding each weight to its nearest grid point ignores that the
errors of different input columns add up in y. GPTQ (Frantar et al., 2022) quantises the columns
one at a time and spreads each column's rounding error onto the columns not yet quantised, weighted
by the inverse of H = E[x x^T] (the Hessian of the layer's squared output error), so the output
error E||x (W - Q)^T||^2 is (greedily) minimised rather than the weight error.

Here the grid is exactly the export format's: the per-row scales come from the format's clip rule
(row max, quantile or per-row search) on the original weights, then GPTQ decides the integers in
[qmin, qmax]. Dequantisation is unchanged (q * s), so a GPTQ artifact loads like any other.
A format's rounding rule (``:fp32div``, the scripts' round-to-nearest against the unrounded fp32
scale) does not apply here: GPTQ always rounds against the stored scale, the one its error
feedback measures (err = w - q * s_stored), as every GPTQ record did (``round(w / s.float())``
with s already fp16). The rule still shapes the clip choice of ``search`` (``row_clips``).

Details: damping ``gptq_damp * mean(diag H)`` is added to the diagonal (a Cholesky failure retries
with 10x more, up to three times); columns with zero activation energy get H_ii = 1 (their weights
are rounded as usual; the original zeroes them, which would change the layer for inputs the
calibration set happened not to excite); with ``gptq_act_order`` the columns are processed in order
of decreasing diag(H) (the records' "column reordering"); errors are propagated lazily in blocks of
``gptq_block_size`` columns.

Hessians come from ``collect_hessians`` with a calibration source from ``pgolf.quant.calib``:
training shards or self-generated text, never validation tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pgolf.quant.config import QuantConfig
from pgolf.quant.formats import FLOAT_FORMATS, Format, as_rows, row_clips, stored_scale


def _upper_cholesky_of_inverse(H: Tensor, damp_frac: float) -> Tensor:
    diag_mean = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for attempt in range(4):
        damped = H + (damp_frac * (10**attempt)) * diag_mean * eye
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
    raise ValueError("GPTQ: the Hessian is not positive definite even with 1000x damping; raise quant.gptq_damp")


def hessian_row_gain(rows: Tensor, H: Tensor, lam: float) -> Tensor:
    """Hessian-aware SDClip's per-row factor 1 + lambda (row_imp - 1): column importance
    diag(H)_j / mean(diag H) (diagonal clamped >= 1e-8), row importance mean_j |W_rj| col_imp_j
    renormalised to mean 1."""
    d = torch.diag(H).float().cpu().clamp_min(1e-8)
    col_imp = d / d.mean()
    row_imp = (rows.abs() * col_imp[None, :]).mean(dim=1)
    row_imp = row_imp / row_imp.mean().clamp_min(1e-30)
    return 1.0 + lam * (row_imp - 1.0)


@torch.no_grad()
def gptq_quantize(w: Tensor, H: Tensor, fmt: Format, cfg: QuantConfig, *, sd_k: float | None = None) -> tuple[Tensor, Tensor]:
    """Quantise the 2-D weight ``w`` [out, in] given ``H`` [in, in]; returns (q int8 [R, C], stored
    scale [R]) on the CPU, like ``formats.quantize_rows``. ``sd_k``: the k of the ``sd`` clip rule
    (SDClip); with ``cfg.sdclip_hessian_lambda`` > 0 its clips get the Hessian-aware row factor."""
    assert fmt.kind == "int" and w.ndim == 2
    scale_dtype = FLOAT_FORMATS[cfg.scale_dtype]
    rows = as_rows(w)
    gain = hessian_row_gain(rows, H, cfg.sdclip_hessian_lambda) if fmt.clip == "sd" and cfg.sdclip_hessian_lambda > 0 else None
    clip = row_clips(rows, fmt, clip_quantile=cfg.clip_quantile, scale_floor=cfg.scale_floor, scale_dtype=scale_dtype,
                     sd_k=sd_k, row_gain=gain)
    scale = stored_scale(clip, fmt, cfg.scale_floor, scale_dtype)
    device = H.device
    H = H.to(device=device, dtype=torch.float32).clone()
    W = rows.to(device).clone()
    s = scale.float().to(device)
    cols = W.shape[1]
    assert H.shape == (cols, cols), f"Hessian {tuple(H.shape)} does not match weight {tuple(W.shape)}"
    dead = torch.diag(H) <= 0
    H[dead, dead] = 1.0
    if cfg.gptq_act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = _upper_cholesky_of_inverse(H, cfg.gptq_damp)
    Q = torch.zeros_like(W)
    block = max(1, cfg.gptq_block_size)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            q = torch.clamp(torch.round(col / s), fmt.qmin, fmt.qmax)
            Q[:, i1 + i] = q
            err = (col - q * s) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if cfg.gptq_act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(torch.int8).cpu().contiguous(), scale


def gptq_targets(model: nn.Module, qcfg: QuantConfig) -> dict[str, nn.Module]:
    """Weight name -> the module whose *input* is the weight's calibration activation: every
    CastedLinear whose export format is an integer one, and with ``gptq_embed`` the tied embedding
    (or untied head), whose input is the final norm's output (R4+: "GPTQ embeddings")."""
    from pgolf.model.layers import CastedLinear
    from pgolf.quant.export import choose_format

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, CastedLinear) and name != "lm_head":
            wname = f"{name}.weight"
            if choose_format(wname, module.weight, qcfg).startswith("int"):
                out[wname] = module
    if qcfg.gptq_embed:
        head = getattr(model, "lm_head", None)
        wname, weight = ("tok_emb.weight", model.tok_emb.weight) if head is None else ("lm_head.weight", head.weight)
        if choose_format(wname, weight, qcfg).startswith("int"):
            out[wname] = model.final_norm  # hooked on its output: the LM head's input
    return out


@torch.no_grad()
def collect_hessians(model: nn.Module, source, qcfg: QuantConfig, *, amp_dtype: torch.dtype | None = None, progress: bool = False) -> dict[str, Tensor]:
    """H = mean over calibration tokens of x x^T at the input of every quantised linear, and with
    ``gptq_embed`` at the final norm's output for the LM head's weight (the tied embedding).

    ``source`` must be a ``TrainTokens`` or ``SelfGenerated`` (``pgolf.quant.calib``): the only
    ways to obtain calibration tokens, neither of which can read validation shards. The model runs
    with its layer loops on (evaluation always loops), so a looped block's linears add one
    contribution per pass. Linears that never see an input get no Hessian and are rounded to
    nearest. The Hessians are this process's own (rank-local, as the records: no all-reduce)."""
    from pgolf.eval.standard import autocast_context
    from pgolf.quant.calib import check_source

    check_source(source)
    device = next(model.parameters()).device
    targets = gptq_targets(model, qcfg)
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    live = [False]  # only the calibration forwards count (SelfGenerated runs the model to sample, too)

    def add(wname: str, x: Tensor) -> None:
        if not live[0]:
            return
        x = x.detach()
        x = x.reshape(-1, x.shape[-1]).float()
        if wname not in sums:
            sums[wname] = torch.zeros(x.shape[1], x.shape[1], device=x.device, dtype=torch.float32)
            counts[wname] = 0
        sums[wname].addmm_(x.T, x)
        counts[wname] += x.shape[0]

    handles = []
    for wname, module in targets.items():
        if module is getattr(model, "final_norm", None):
            handles.append(module.register_forward_hook(lambda m, args, out, n=wname: add(n, out)))
        else:
            handles.append(module.register_forward_pre_hook(lambda m, args, n=wname: add(n, args[0])))
    was_training = model.training
    was_looping = getattr(model, "looping_active", None)
    model.eval()
    if was_looping is not None:
        model.set_looping(True)
    try:
        for ids in source.batches(device, progress=progress):
            live[0] = True
            with autocast_context(device, amp_dtype):
                model.forward_hidden(ids)
            live[0] = False
    finally:
        live[0] = False
        for h in handles:
            h.remove()
        model.train(was_training)
        if was_looping is not None:
            model.set_looping(was_looping)
    # kept on the model's device: gptq_quantize runs where its Hessian is (the GPU in a real run)
    return {n: sums[n] / max(counts[n], 1) for n in sums}
