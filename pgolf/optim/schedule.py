"""LR scale (warmdown) and Muon momentum warm-up, as functions of step and training time."""

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


def muon_momentum(step: int, *, start: float, end: float, warmup_steps: int) -> float:
    """Linear warm-up of the Muon momentum from ``start`` to ``end`` over ``warmup_steps``."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1.0 - frac) * start + frac * end
