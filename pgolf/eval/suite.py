"""The evaluations that end a run, on the model reloaded from the artifact file, with the
challenge's final log-line names (``final_<label>_roundtrip[_exact]``,
``final_<label>_sliding_window[_exact]``)."""

from __future__ import annotations

from typing import Any


def final_evaluations(model, trainer: Any, label: str) -> dict[str, float]:
    """Standard eval of the round-tripped model, then the sliding-window eval when configured.
    ``trainer`` supplies cfg, ctx, logger, val_tokens, lut and the autocast dtype."""
    cfg, log = trainer.cfg, trainer.logger
    res = trainer.validate(model)
    log.log(f"final_{label}_roundtrip val_loss:{res.val_loss:.4f} val_bpb:{res.val_bpb:.4f} eval_time:{1000 * res.seconds:.0f}ms")
    log.log(f"final_{label}_roundtrip_exact val_loss:{res.val_loss:.8f} val_bpb:{res.val_bpb:.8f}")
    out = {
        "val_loss_roundtrip": res.val_loss,
        "val_bpb_roundtrip": res.val_bpb,
        "eval_seconds_roundtrip": res.seconds,
        "val_targets_roundtrip": res.targets,
    }
    return out
