"""Weight averaging: EMA (an fp32 shadow updated after every optimizer step) and SWA (the uniform
mean of snapshots taken during warmdown, of the raw weights or of the EMA).

Every rank keeps identical copies (parameters are identical after each synchronised step), so
the averages are DDP-correct without communication.
"""

from __future__ import annotations

import torch
from collections.abc import Callable

from torch import Tensor, nn

from pgolf.train.config import AveragingConfig


class EMA:
    """shadow <- decay * shadow + (1 - decay) * w, in fp32, for every floating state entry."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self._live = {k: v for k, v in model.state_dict(keep_vars=True).items() if v.is_floating_point()}
        self.shadow = {k: v.detach().float().clone() for k, v in self._live.items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        keys = list(self.shadow)
        targets = [self._live[k].detach() for k in keys]
        targets = [t if t.dtype == torch.float32 else t.float() for t in targets]
        torch._foreach_lerp_([self.shadow[k] for k in keys], targets, 1.0 - self.decay)


class SnapshotMean:
    """Running sum of fp32 snapshots (on CPU) and their count."""

    def __init__(self) -> None:
        self.sum: dict[str, Tensor] = {}
        self.count = 0

    @torch.no_grad()
    def add(self, state: dict[str, Tensor]) -> None:
        for k, v in state.items():
            if not v.is_floating_point():
                continue
            v32 = v.detach().float().cpu()
            if k in self.sum:
                self.sum[k] += v32
            else:
                self.sum[k] = v32.clone()
        self.count += 1

    def mean(self) -> dict[str, Tensor]:
        return {k: v / self.count for k, v in self.sum.items()}


class WeightAverager:
    """Drives EMA and SWA from the loop and produces the weights to export."""

    def __init__(self, cfg: AveragingConfig, model: nn.Module):
        self.cfg = cfg
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.swa = SnapshotMean() if cfg.swa_every > 0 else None
        self.swa_start_step: int | None = None
        # parallel EMA tracks (issue 16): independent EMAs; the proxy picks the exported one
        self.tracks = [EMA(model, d) for d in cfg.ema_tracks]
        self.selected: EMA | None = None

    def after_step(self, model: nn.Module, step: int, lr_scale: float) -> str | None:
        """Call after each optimizer step with the new step count; returns a log line or None."""
        if self.ema is not None:
            self.ema.update(model)
        for track in self.tracks:
            track.update(model)
        if self.swa is None or lr_scale >= self.cfg.swa_start_scale or step % self.cfg.swa_every:
            return None
        source = self.ema.shadow if self.cfg.swa_source == "ema" else model.state_dict()
        self.swa.add(source)
        if self.swa_start_step is None:
            self.swa_start_step = step
            return f"swa:start step:{step} source={self.cfg.swa_source}"
        return None

    def candidates(self) -> list[tuple[str, EMA]]:
        """The EMAs the proxy chooses among: the main EMA (when ``ema_decay`` > 0), then each track."""
        main = [(f"ema decay={self.ema.decay:g}", self.ema)] if self.ema is not None else []
        return main + [(f"track{i} decay={t.decay:g}", t) for i, t in enumerate(self.tracks)]

    def select_track(self, proxy_loss: Callable[[dict[str, Tensor]], float]) -> list[str]:
        """Score every candidate's shadow with ``proxy_loss`` (held-out training tokens, never
        validation) and keep the lowest (the first on a tie) for ``export_state``; returns the
        ``ema_tracks:`` log lines."""
        scored = [(name, ema, float(proxy_loss(ema.shadow))) for name, ema in self.candidates()]
        best = min(range(len(scored)), key=lambda i: scored[i][2])
        self.selected = scored[best][1]
        lines = [f"ema_tracks: {name} proxy_loss:{loss:.6f}" for name, _, loss in scored]
        return lines + [f"ema_tracks: chose {scored[best][0]} (lowest proxy loss {scored[best][2]:.6f})"]

    def export_state(self, model: nn.Module) -> tuple[dict[str, Tensor], str]:
        """The state dict to export (each tensor in the live tensor's dtype) and a log line.

        ``swa`` with at least two snapshots exports their mean; with fewer it exports the SWA
        source (the EMA for ``swa_source=ema``, else the raw weights), as PR #89/#401 do.
        """
        live = model.state_dict()
        choice = self.cfg.export
        if choice == "swa" and self.swa is not None and self.swa.count > 1:
            avg, msg = self.swa.mean(), f"swa:applying averaged {self.swa.count} checkpoints (from {self.cfg.swa_source})"
        elif self.tracks and choice == "ema":
            if self.selected is None:
                raise RuntimeError("avg.ema_tracks: select_track must score the tracks before export_state")
            avg, msg = self.selected.shadow, f"ema_tracks:loading the chosen EMA (decay={self.selected.decay:g})"
        elif self.ema is not None and (choice == "ema" or (choice == "swa" and self.cfg.swa_source == "ema")):
            avg, msg = self.ema.shadow, "ema:loading final weights" + (" (no SWA)" if choice == "swa" else "")
        else:
            return {k: v.detach().clone() for k, v in live.items()}, "export:raw weights"
        out = {k: (avg[k].to(device=v.device, dtype=v.dtype) if k in avg else v.detach().clone()) for k, v in live.items()}
        return out, msg
