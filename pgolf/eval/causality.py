"""Dynamic causality check (the token-flip test of PR #1240, field-notes sections 1.1 and 2.3).

Indexing as in ``pgolf.eval.sliding``: the stream ``v`` has N + 1 tokens; target i is ``v[i + 1]``.
For a sampled stream position p (1 <= p <= N) the check replaces ``v[p]`` by another token,
re-runs the *whole* evaluation on the changed stream, and requires that the scored NLL of every
target before it (targets ``0 .. p - 2``, i.e. stream tokens ``v[1 .. p - 1]``) is unchanged up
to a float tolerance. Target ``p - 1`` is the flipped token itself and targets after it may change.
(Only NLLs are compared, so a model whose distribution at target ``p - 1`` reads that target
itself is outside this test; a normalisation check covers that case, condition C2.)

A legal evaluation passes: its score of ``v[j]`` may depend only on the artifact and ``v[0..j-1]``
(condition C1 of issue #1017) and, with test-time training, the weights that score ``v[j]`` have
only seen targets scored before it (C3, score before update). An evaluation that looks ahead
(a non-causal model, a window that scores with later tokens, TTT that trains on a chunk before
scoring it, or on the whole stream first) changes scores before p and fails.

Modes: ``plain`` (the standard eval, through ``evaluate_standard`` itself), ``sliding``,
``ttt`` (score-first TTT as configured) and ``phased`` (phased TTT, ``pgolf.eval.phased``).

Scoring order. The stream modes score in stream order. Phased TTT scores documents in
length-sorted batches, so a document late in the stream can be scored (and adapted on) before an
earlier one; its legality condition is "before" in *scoring* order. Its scorer also returns a key
per target (the forward step that scored it, times N + 1, plus the target index); a flip at p must
then leave unchanged every target whose key is below that of target p - 1 (targets scored in earlier
steps, and the targets of the same step before p - 1 in the stream: the other documents of that
batch and the earlier targets of p's own). The document structure (the BOS positions), which the
protocol reads up front to sort the documents (as the records do), is kept: BOS tokens are not
flipped and no token is flipped into BOS; the check asserts that the scoring order is unchanged. ``check_causality`` also accepts any ``scorer``
(stream -> per-target NLL), which is how the tests run deliberately illegal evaluations; no
illegal mode exists in the package. Cost: one full evaluation per position (plus two for the
baseline and its noise floor), so the audit runs on a prefix of the validation stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from pgolf.eval.bpb import ByteLUT
from pgolf.eval.config import TTTConfig
from pgolf.eval.standard import evaluate_standard

# stream [N + 1] -> per-target NLL [N] (float64, CPU), or (NLL, scoring-order key [N] int64)
Scorer = Callable[[Tensor], "Tensor | tuple[Tensor, Tensor]"]
MODES = ("plain", "sliding", "ttt", "phased")


def make_scorer(
    model: nn.Module,
    lut: ByteLUT,
    mode: str,
    *,
    seq_len: int,
    stride: int = 0,
    ttt_cfg: TTTConfig | None = None,
    batch_windows: int = 32,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    runner_cls: type | None = None,
) -> Scorer:
    """A single-process scorer that runs the package's own evaluation code for ``mode``
    (``runner_cls``: a ``PhasedTTT`` subclass for phased mode, which is how the tests plant an
    illegal variant)."""
    device = torch.device(device)
    if mode == "plain":

        def plain(tokens: Tensor) -> Tensor:
            if (tokens.numel() - 1) % seq_len:
                raise ValueError(f"plain mode needs a stream of whole {seq_len}-token windows (+1), got {tokens.numel()}")
            parts: list[Tensor] = []

            def recording_nll(x: Tensor, y: Tensor, first: int) -> Tensor:
                out = model.token_nll(x, y, first)
                parts.append(out.detach().float().reshape(-1).cpu())  # batches come in stream order (one rank)
                return out

            evaluate_standard(recording_nll, tokens, seq_len, lut, batch_tokens=seq_len * batch_windows, device=device, autocast_dtype=autocast_dtype)
            return torch.cat(parts).to(torch.float64)

        return plain
    if mode == "sliding":
        from pgolf.eval.sliding import evaluate_sliding

        def sliding(tokens: Tensor) -> Tensor:
            out = torch.zeros(tokens.numel() - 1, dtype=torch.float64)
            evaluate_sliding(model.token_nll, tokens, seq_len, stride or seq_len, lut, batch_windows=batch_windows, device=device, autocast_dtype=autocast_dtype, token_nll_out=out)
            return out

        return sliding
    if mode == "ttt":
        from pgolf.eval.ttt import evaluate_ttt

        if ttt_cfg is None or ttt_cfg.mode == "off":
            raise ValueError("ttt mode needs a TTTConfig with mode sgd or lora")

        def ttt(tokens: Tensor) -> Tensor:
            out = torch.zeros(tokens.numel() - 1, dtype=torch.float64)
            evaluate_ttt(model, tokens, lut, ttt_cfg, seq_len=seq_len, stride=stride or seq_len, batch_windows=batch_windows, device=device, autocast_dtype=autocast_dtype, token_nll_out=out)
            return out

        return ttt
    if mode == "phased":
        from pgolf.eval.phased import PhasedTTT

        if ttt_cfg is None or ttt_cfg.mode != "phased":
            raise ValueError("phased mode needs a TTTConfig with mode phased")
        cls = runner_cls or PhasedTTT

        def phased(tokens: Tensor) -> tuple[Tensor, Tensor]:
            runner = cls(model, tokens, lut, ttt_cfg, seq_len=seq_len, device=device, autocast_dtype=autocast_dtype,
                         bos_id=int(model.cfg.bos_id), record_order=True)
            runner.run()
            n = tokens.numel() - 1
            assert int(runner.order.min()) >= 0, "phased TTT left a target unscored"
            return runner.scores.nll.detach().cpu().to(torch.float64), runner.order * (n + 1) + torch.arange(n)

        return phased
    raise ValueError(f"unknown causality mode {mode!r}; valid: {', '.join(MODES)}")


@dataclass
class PositionCheck:
    position: int  # stream index p whose token was replaced
    old_token: int
    new_token: int
    max_diff_before: float  # max |NLL change| over targets 0 .. p - 2
    targets_before: int
    changed_from: int  # targets at or after p - 1 whose NLL changed (0 would make the check vacuous)
    passed: bool


@dataclass
class CausalityReport:
    mode: str
    n_targets: int
    tolerance: float
    noise_floor: float  # max |NLL difference| between two runs on the same stream
    checks: list[PositionCheck] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def max_diff_before(self) -> float:
        return max((c.max_diff_before for c in self.checks), default=0.0)

    def summary(self) -> str:
        bad = [c.position for c in self.checks if not c.passed]
        verdict = "PASS" if self.passed else f"FAIL at positions {bad[:8]}"
        return (
            f"causality {self.mode}: {verdict} ({len(self.checks)} positions, {self.n_targets} targets, "
            f"max |dNLL| before the flip {self.max_diff_before:.3g}, tolerance {self.tolerance:.3g}, "
            f"noise floor {self.noise_floor:.3g}, {self.seconds:.1f}s)"
        )

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "passed": self.passed,
            "n_targets": self.n_targets,
            "positions": len(self.checks),
            "max_diff_before": self.max_diff_before,
            "tolerance": self.tolerance,
            "noise_floor": self.noise_floor,
            "seconds": self.seconds,
            "checks": [vars(c) for c in self.checks],
        }


def sample_positions(n_targets: int, count: int, seed: int) -> list[int]:
    """``count`` distinct stream positions in [2, N] (p = 1 has no earlier target to check)."""
    assert n_targets >= 2, "the causality check needs at least two targets"
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_targets - 1, generator=gen)[: min(count, n_targets - 1)] + 2
    return sorted(int(p) for p in perm)


def check_causality(
    model: nn.Module | None,
    val_tokens: Tensor,
    lut: ByteLUT | None,
    *,
    mode: str = "sliding",
    seq_len: int = 1024,
    stride: int = 64,
    positions: int = 16,
    seed: int = 0,
    ttt_cfg: TTTConfig | None = None,
    atol: float = 1e-6,
    vocab_size: int | None = None,
    batch_windows: int = 32,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    scorer: Scorer | None = None,
    progress: bool = False,
    keep_tokens: tuple[int, ...] | None = None,
    at: list[int] | None = None,
) -> CausalityReport:
    """Flip one token at each of ``positions`` random stream positions (or at the positions
    ``at``) and verify that no target before it (in scoring order) changes its NLL by more than
    ``max(atol, 4 * noise_floor)``.

    ``scorer`` overrides the evaluation (then ``model``/``lut`` may be None); otherwise the
    package's evaluation for ``mode`` runs on ``model``. ``keep_tokens`` are never flipped nor
    flipped into (phased mode: the BOS id, by default). Single process."""
    t0 = time.perf_counter()
    tokens = val_tokens.detach().to("cpu", torch.int64).clone()
    n = tokens.numel() - 1
    if scorer is None:
        assert model is not None and lut is not None, "check_causality needs a model and a LUT, or a scorer"
        scorer = make_scorer(model, lut, mode, seq_len=seq_len, stride=stride, ttt_cfg=ttt_cfg, batch_windows=batch_windows, device=device, autocast_dtype=autocast_dtype)
    if vocab_size is None:
        vocab_size = int(model.cfg.vocab_size) if model is not None and hasattr(model, "cfg") else int(tokens.max()) + 1
    if keep_tokens is None:
        keep_tokens = (int(model.cfg.bos_id),) if mode == "phased" and model is not None else ()
    base, key = _scored(scorer(tokens), n)
    again, key2 = _scored(scorer(tokens), n)
    assert torch.equal(key, key2), "the scoring order differs between two runs on the same stream"
    noise = float((base - again).abs().max())
    tol = max(atol, 4.0 * noise)
    report = CausalityReport(mode, n, tol, noise)
    gen = torch.Generator().manual_seed(seed + 1)
    kept = torch.tensor(sorted(set(keep_tokens)), dtype=torch.int64)
    if at is not None:
        pos_list = sorted(int(p) for p in at)
        assert all(2 <= p <= n for p in pos_list), f"flip positions must be in [2, {n}]"
    else:
        eligible = torch.nonzero(~torch.isin(tokens[2:], kept)).flatten() + 2
        pick = torch.randperm(eligible.numel(), generator=torch.Generator().manual_seed(seed))[: min(positions, eligible.numel())]
        pos_list = sorted(int(p) for p in eligible[pick])
    choices = torch.tensor([t for t in range(vocab_size) if t not in set(kept.tolist())], dtype=torch.int64)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(pos_list, desc=f"causality {mode}", unit="flip", leave=False, dynamic_ncols=True, disable=None)
    for p in bar if bar is not None else pos_list:
        old = int(tokens[p])
        assert old not in set(kept.tolist()), f"position {p} holds a kept token ({old})"
        others = choices[choices != old]
        new = int(others[int(torch.randint(others.numel(), (1,), generator=gen))])
        flipped = tokens.clone()
        flipped[p] = new
        nll, flipped_key = _scored(scorer(flipped), n)
        assert torch.equal(flipped_key, key), f"flipping position {p} changed the scoring order"
        is_before = key < key[p - 1]
        before = (nll[is_before] - base[is_before]).abs()
        max_before = float(before.max()) if before.numel() else 0.0
        changed = int(((nll[~is_before] - base[~is_before]).abs() > tol).sum())
        report.checks.append(PositionCheck(p, old, new, max_before, int(is_before.sum()), changed, max_before <= tol))
    report.seconds = time.perf_counter() - t0
    return report


def _scored(out, n: int) -> tuple[Tensor, Tensor]:
    """(NLL [N] float64, scoring-order key [N]) from a scorer's output (stream order if no key)."""
    nll, key = out if isinstance(out, tuple) else (out, torch.arange(n))
    assert nll.shape == (n,), f"scorer returned shape {tuple(nll.shape)}, expected ({n},)"
    return nll.to(torch.float64), key.to(torch.int64)
