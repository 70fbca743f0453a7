"""LR scale (warmdown), Muon momentum warm-up and Muon WD taper, as functions of step, training
time or the training fraction. Pure functions: the loop passes the config values in."""

from __future__ import annotations


# Steps before the wallclock warmdown trusts its step-time estimate. The challenge's formula
# estimates step time as elapsed / step; one slow early step (a noisy shared CPU, a cold cache) then
# projects an enormous step time and drops the LR scale to ~0 at step 1, which also fires every
# scale-triggered event (late QAT, SWA). On 8xH100 the warmdown starts thousands of steps later,
# so holding the scale at 1 for the first steps changes nothing there.
MIN_STEPS_FOR_ESTIMATE = 10


def lr_scale(step: int, elapsed_ms: float, *, iterations: int, warmdown_iters: int, max_wallclock_ms: float | None) -> float:
    """Multiplier on every group's base LR. There is no LR warm-up.

    With a wallclock cap the warmdown is linear in *time*: with step_ms = elapsed / step, it starts
    when the remaining time drops below warmdown_iters * step_ms and reaches 0 exactly at the cap
    (the scale is 1 for the first MIN_STEPS_FOR_ESTIMATE steps, see above). Without a cap it is
    linear over the last ``warmdown_iters`` of ``iterations``.
    """
    if warmdown_iters <= 0:
        return 1.0
    if max_wallclock_ms is None:
        start = max(iterations - warmdown_iters, 0)
        if start <= step < iterations:
            return max((iterations - step) / max(warmdown_iters, 1), 0.0)
        return 1.0
    if step < MIN_STEPS_FOR_ESTIMATE and elapsed_ms < max_wallclock_ms:
        return 1.0
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = warmdown_iters * step_ms
    remaining_ms = max(max_wallclock_ms - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def training_fraction(step: int, elapsed_ms: float, *, iterations: int, max_wallclock_ms: float | None) -> float:
    """How far training is, for the fraction-based schedules (R3+): elapsed / cap when there is a
    wallclock cap (the caller passes the cap net of any reserve), else step / iterations."""
    if max_wallclock_ms is not None and max_wallclock_ms > 0:
        return elapsed_ms / max_wallclock_ms
    return step / max(iterations, 1)


def lr_scale_frac(frac: float, warmdown_frac: float, min_lr: float) -> float:
    """Fraction-based warmdown (R3+): 1 while frac < 1 - warmdown_frac, then (1 - frac) /
    warmdown_frac, floored at ``min_lr`` (R6/R7: 0.10, reached at frac = 1 - min_lr * warmdown_frac).
    warmdown_frac <= 0 means no warmdown."""
    if warmdown_frac <= 0 or frac < 1.0 - warmdown_frac:
        return 1.0
    return max((1.0 - frac) / warmdown_frac, min_lr)


def lr_scale_d2z(frac: float) -> float:
    """D2Z (train.lr_schedule=d2z): linear decay to zero over the whole run, 1 - frac, at least 0."""
    return max(1.0 - frac, 0.0)


def muon_wd_multiplier(frac: float, taper_start: float, taper_final: float) -> float:
    """Muon WD taper (PR #1729 record): 1 up to frac = taper_start, then linear to taper_final at
    frac = 1 (held there after). taper_start >= 1 or taper_final == 1 is off."""
    if taper_start >= 1.0 or taper_final == 1.0 or frac <= taper_start:
        return 1.0
    t = min((frac - taper_start) / (1.0 - taper_start), 1.0)
    return 1.0 + (taper_final - 1.0) * t


def muon_momentum(step: int, *, start: float, end: float, warmup_steps: int) -> float:
    """Linear warm-up of the Muon momentum from ``start`` to ``end`` over ``warmup_steps``."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1.0 - frac) * start + frac * end
