"""Sequence-length curriculum and batch warm-up (issue 16 experiment switches; off in every preset).

* ``train.seq_len_schedule`` = "L1:f1,L2:f2,...": from training fraction f_i on, sequences are
  L_i tokens long (the fraction is the one of the other fraction-based schedules: elapsed / cap
  with a wallclock cap, else step / iterations). The first stage starts at 0 and the last length
  is ``train.train_seq_len`` (evaluation and the artifact use that length); "" = off.
* ``train.batch_warmup_tokens`` = B0 > 0 with ``train.batch_warmup_steps`` = S > 0: the global
  batch at step k < S is B0 + (B - B0) k / S rounded down to a multiple of Q = B / BATCH_LEVELS
  (at least Q), B = ``train.train_batch_tokens`` from step S on.

Under torch.compile (dynamic=False) every distinct (batch, length) shape compiles its own graph,
once, the first time it is used: the quantisation to B / 8 keeps that to at most 8 batch shapes per
length, and the compile warm-up primes each shape of the schedule before the clock starts.
``Curriculum.at(step, frac)`` is the single place the loop asks for the step's batch and length.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgolf.errors import ConfigError

if TYPE_CHECKING:
    from pgolf.train.config import TrainConfig

BATCH_LEVELS = 8  # batch warm-up sizes are multiples of train_batch_tokens / BATCH_LEVELS


def parse_seq_len_schedule(text: str) -> list[tuple[float, int]]:
    """ "256:0,2048:0.3" -> [(0.0, 256), (0.3, 2048)] (start fraction, length), checked."""
    stages: list[tuple[float, int]] = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        try:
            length, start = item.split(":")
            stages.append((float(start), int(length)))
        except ValueError:
            raise ConfigError(f"train.seq_len_schedule: {item!r} is not LENGTH:FRACTION (e.g. \"256:0,2048:0.3\")") from None
    if not stages:
        raise ConfigError("train.seq_len_schedule: empty; give LENGTH:FRACTION pairs or \"\" for off")
    starts = [f for f, _ in stages]
    if starts[0] != 0.0 or starts != sorted(starts) or len(set(starts)) != len(starts) or starts[-1] >= 1.0:
        raise ConfigError(f"train.seq_len_schedule: fractions must start at 0, increase strictly and stay below 1, got {starts}")
    if any(length < 1 for _, length in stages):
        raise ConfigError("train.seq_len_schedule: every length must be >= 1")
    return stages


class Curriculum:
    """The global batch (tokens) and sequence length of every step."""

    def __init__(self, train_cfg: TrainConfig, world_size: int = 1, accum: int = 1):
        t = train_cfg
        self.full = int(t.train_batch_tokens)
        self.stages = parse_seq_len_schedule(t.seq_len_schedule) if t.seq_len_schedule else [(0.0, int(t.train_seq_len))]
        if self.stages[-1][1] != t.train_seq_len:
            raise ConfigError(f"train.seq_len_schedule: the last length must be train.train_seq_len={t.train_seq_len}, got {self.stages[-1][1]}")
        self.warmup_start = int(t.batch_warmup_tokens)
        self.warmup_steps = int(t.batch_warmup_steps)
        self.quantum = self.full // BATCH_LEVELS
        unit = world_size * accum
        sizes = self.batch_sizes()
        for _, length in self.stages:
            for size in sizes:
                if size % (unit * length):
                    raise ConfigError(
                        f"train.batch_warmup_tokens/seq_len_schedule: a batch of {size} tokens does not split into whole "
                        f"sequences of {length} over {world_size} rank(s) x {accum} micro-steps; make train_batch_tokens/"
                        f"{BATCH_LEVELS if self.warming else 1} a multiple of {unit * length}"
                    )

    @property
    def warming(self) -> bool:
        return self.warmup_start > 0 and self.warmup_steps > 0 and self.warmup_start < self.full

    def batch_tokens(self, step: int) -> int:
        if not self.warming or step >= self.warmup_steps:
            return self.full
        raw = self.warmup_start + (self.full - self.warmup_start) * step / self.warmup_steps
        return max(self.quantum, int(raw // self.quantum) * self.quantum)

    def seq_len(self, frac: float) -> int:
        return [length for start, length in self.stages if start <= frac][-1]

    def at(self, step: int, frac: float) -> tuple[int, int]:
        """(global batch tokens, sequence length) of step ``step`` at training fraction ``frac``."""
        return self.batch_tokens(step), self.seq_len(frac)

    def batch_sizes(self) -> list[int]:
        """Every batch size the warm-up visits, then the full batch."""
        if not self.warming:
            return [self.full]
        return sorted({self.batch_tokens(k) for k in range(self.warmup_steps)} | {self.full})

    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch, length) pair a run can visit (the compile warm-up primes each once)."""
        return [(b, length) for _, length in self.stages for b in self.batch_sizes()]

    @property
    def active(self) -> bool:
        return self.warming or len(self.stages) > 1
