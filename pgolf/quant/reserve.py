"""The GPTQ time reserve: training stops ``quant.gptq_reserve_seconds`` before the wallclock cap so
that the Hessian collection (it reads training data) finishes inside the 600 s. R6/R7 reserved
0.5 s and collected Hessians for 3.5-4.9 s after the clock stopped (frontier.md 4.2), so the
reserve is not trusted here: it is checked against a measurement.

* ``measure_hessian_seconds`` times one whole collection exactly as the run will do it after
  training (same source and number of calibration tokens, loops on, this machine), on the current
  weights: the time does not depend on their values. The Hessians are thrown away.
* ``check_gptq_reserve`` refuses a reserve shorter than a measured collection with a one-line
  ``GPTQReserveError`` naming the key and the value to set.

A run calls ``gptq_preflight`` among its pre-flight checks (``pgolf.train.run.run_training``,
before the run folder is touched and long before the clock starts): it refuses to train with a
reserve that cannot hold the collection, or with ``quant.gptq_reserve_seconds = -1`` (auto) sets
the reserve to the measured time + 20%; after training the real collection is logged against the
reserve used (``gptq_reserve:...``, ``gptq_reserve_report``).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn

from pgolf.errors import ConfigError


class GPTQReserveError(ConfigError):
    """quant.gptq_reserve_seconds is shorter than the measured Hessian collection."""


def suggested_reserve(measured_seconds: float, margin: float = 1.2) -> float:
    """The measured time with a 20% margin, rounded up to 0.5 s."""
    return math.ceil(2.0 * measured_seconds * margin) / 2.0


def check_gptq_reserve(reserve_seconds: float, measured_seconds: float, *, when: str = "measured at start") -> None:
    """Raise ``GPTQReserveError`` when the reserve cannot hold the measured collection."""
    if measured_seconds > reserve_seconds:
        raise GPTQReserveError(
            f"quant.gptq_reserve_seconds={reserve_seconds:g} is shorter than the GPTQ Hessian collection "
            f"({measured_seconds:.2f} s, {when}): calibration would run past the training cap "
            f"(frontier.md 4.2); set --set quant.gptq_reserve_seconds={suggested_reserve(measured_seconds):g} or more, "
            "or calibrate on fewer tokens (quant.gptq_calib_batches / quant.gptq_calib_seqs)"
        )


def measure_hessian_seconds(model: nn.Module, cfg, amp_dtype: torch.dtype | None = None, *, rank: int = 0, world_size: int = 1) -> float:
    """Seconds of one full Hessian collection of ``cfg``'s calibration on ``model`` (rank-local,
    CUDA synchronised before and after). Training state, looping state and weights are unchanged."""
    from pgolf.quant.calib import calibration_source
    from pgolf.quant.gptq import collect_hessians

    device = next(model.parameters()).device
    if device.type == "cuda":  # one untimed forward first: CUDA context, cuBLAS handles (warm after training)
        from pgolf.eval.standard import autocast_context

        was_training = model.training
        model.eval()
        with torch.no_grad(), autocast_context(device, amp_dtype):
            model.forward_hidden(torch.zeros(1, 64, dtype=torch.int64, device=device))
        model.train(was_training)
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    source = calibration_source(cfg, model, amp_dtype, rank=rank, world_size=world_size)
    hessians = collect_hessians(model, source, cfg.quant, amp_dtype=amp_dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    del hessians
    return seconds


def gptq_preflight(model: nn.Module, cfg, amp_dtype: torch.dtype | None = None, *, rank: int = 0, world_size: int = 1,
                   reduce_max: Callable[[float], float] | None = None) -> tuple[float, float] | None:
    """At run start: measure the collection and refuse a reserve that cannot hold it. Returns
    (reserve to use, measured seconds), or None when GPTQ is off or training has no wallclock cap.
    ``quant.gptq_reserve_seconds = -1`` (auto) reserves the measured time + 20% (``suggested_reserve``).
    ``reduce_max``: under several processes, the maximum over ranks of a float (every rank then
    takes the same decision: the slowest rank's collection is what the reserve must hold)."""
    if cfg.quant.gptq != "full" or cfg.train.max_wallclock_seconds <= 0:
        return None
    seconds = measure_hessian_seconds(model, cfg, amp_dtype, rank=rank, world_size=world_size)
    if reduce_max is not None:
        seconds = float(reduce_max(seconds))
    reserve = cfg.quant.gptq_reserve_seconds
    if reserve < 0:
        return suggested_reserve(seconds), seconds
    check_gptq_reserve(reserve, seconds, when="measured at run start on this machine")
    return reserve, seconds


def gptq_reserve_report(reserve: float, measured_seconds: float) -> dict:
    """After training: whether the real collection fitted in the reserve (for the log and summary)."""
    return {"gptq_reserve_seconds": reserve, "gptq_seconds": measured_seconds, "gptq_within_reserve": measured_seconds <= reserve}
