"""Exact sliding-window evaluation: every target of the validation stream scored exactly once,
each with the longest context its window allows.

Indexing. The stream ``v`` holds N + 1 tokens and N targets. Target ``i`` (0 <= i < N) is token
``v[i + 1]`` predicted from ``v[0..i]``. A window of length W starting at ``ws`` feeds inputs
``v[ws : ws + W]`` and targets ``v[ws + 1 : ws + W + 1]``, i.e. targets ``ws .. ws + W - 1``; it
*scores* only its positions ``first .. W - 1`` (targets ``ws + first .. ws + W - 1``).

The plan, for sequence length L and stride S (1 <= S <= L):

* N <= L: one window, ``ws = 0``, ``W = N``, ``first = 0`` (all N targets).
* N > L: every window has ``W = L``.
  - window 0: ``ws = 0``, ``first = 0``: targets ``[0, L)``, each with all the context there is;
  - window k = 1..K, K = (N - L) // S: ``ws = k * S``, ``first = L - S``: targets
    ``[L + (k - 1) S, L + k S)``, each with ``L - S .. L - 1`` tokens of context;
  - tail, if r = (N - L) % S > 0: ``ws = N - L``, ``first = L - r``: the last r targets
    ``[N - r, N)``, again with ``L - r .. L - 1`` tokens of context.

  So there are ``1 + ceil((N - L) / S)`` windows; their scored ranges tile ``[0, N)`` with no gap
  and no overlap, and every window ends at its last scored target, which gives each scored target
  the longest context a length-L window can give it. With S = L and L dividing N this is exactly
  the standard eval's windows. (PR #89 never scored the first L - S targets; PR #401 rescored the
  last S targets in 31 partial tail windows; PR #201 dropped up to S - 1 tail targets.)

Execution. Consecutive windows with the same ``first`` are batched (``batch_windows`` per forward)
and ``nll_fn(ids, targets, first)`` runs the LM head and cross-entropy on scored positions only.
Windows are split contiguously across ranks. Each rank writes the NLL of every target it scores
into a stream-indexed float64 vector and counts the scorings; the vectors are all-reduced (each
entry is non-zero on exactly one rank, so the sum is exact) and the count must be exactly 1
everywhere, a runtime proof of coverage. Because the total is summed over that one vector, the
result does not depend on how windows are grouped into batches or ranks (as long as a window's
per-token NLL does not depend on its batch-mates, which holds on CPU and is tested), and
test-time training with a zero learning rate reproduces it bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from pgolf.errors import ConfigError
from pgolf.eval.bpb import ByteCounter, EvalResult, target_bytes
from pgolf.eval.standard import NLLFn, autocast_context


@dataclass(frozen=True)
class SlidingPlan:
    """Window starts and first scored positions (see the module docstring for the formula)."""

    n_targets: int
    seq_len: int
    stride: int
    starts: Tensor  # int64 [n_windows]
    first: Tensor  # int64 [n_windows], first scored position inside each window

    @property
    def window_len(self) -> int:
        return min(self.seq_len, self.n_targets)

    @property
    def num_windows(self) -> int:
        return int(self.starts.numel())

    @property
    def tokens_processed(self) -> int:
        """Input tokens run through the model body (windows x window length)."""
        return self.num_windows * self.window_len

    def scored_range(self, w: int) -> tuple[int, int]:
        """Half-open range of target indices that window ``w`` scores."""
        ws = int(self.starts[w])
        return ws + int(self.first[w]), ws + self.window_len

    def first_target(self) -> Tensor:
        """Index of the first target each window scores (int64 [n_windows])."""
        return self.starts + self.first


def sliding_plan(n_targets: int, seq_len: int, stride: int) -> SlidingPlan:
    """The exact-coverage window plan for N = ``n_targets`` targets."""
    if seq_len < 1:
        raise ConfigError(f"sliding eval: sequence length must be >= 1, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise ConfigError(f"sliding eval: stride must be between 1 and the sequence length {seq_len}, got {stride}")
    if n_targets < 1:
        raise ConfigError("sliding eval: the validation stream has no targets")
    n, L, S = n_targets, seq_len, stride
    if n <= L:
        return SlidingPlan(n, L, S, torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    k = (n - L) // S
    starts = [0] + [i * S for i in range(1, k + 1)]
    first = [0] + [L - S] * k
    r = (n - L) % S
    if r:
        starts.append(n - L)
        first.append(L - r)
    return SlidingPlan(n, L, S, torch.tensor(starts, dtype=torch.int64), torch.tensor(first, dtype=torch.int64))


def rank_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous share [lo, hi) of n items for one rank."""
    return n * rank // world_size, n * (rank + 1) // world_size


def window_batches(plan: SlidingPlan, lo: int, hi: int, batch_windows: int) -> Iterator[tuple[int, int]]:
    """Consecutive runs [a, b) of windows in [lo, hi) sharing one ``first``, at most
    ``batch_windows`` long (only windows of one shape go into one forward)."""
    first = plan.first[lo:hi].tolist()  # only this range: TTT calls this once per chunk
    a = 0
    while a < hi - lo:
        b = a + 1
        while b < hi - lo and b - a < batch_windows and first[b] == first[a]:
            b += 1
        yield lo + a, lo + b
        a = b


class StreamScores:
    """Per-target NLL and scoring counts of one pass over a stream, plus the bytes scored.

    Filled by ``score_windows`` on each rank; ``finish`` all-reduces and checks coverage."""

    def __init__(self, n_targets: int, device: torch.device | str):
        self.nll = torch.zeros(n_targets, dtype=torch.float64, device=device)  # holds fp32 NLLs exactly
        self.count = torch.zeros(n_targets, dtype=torch.int32, device=device)
        self.bytes = torch.zeros((), dtype=torch.int64, device=device)
        self.reduced = False

    def finish(self, seconds: float = 0.0) -> EvalResult:
        """All-reduce (exact: every target is written by one rank) and check that every target
        was scored exactly once; returns the result over the whole stream."""
        if not self.reduced and dist.is_available() and dist.is_initialized():
            for t in (self.nll, self.count, self.bytes):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        self.reduced = True
        bad = int((self.count != 1).sum())
        assert bad == 0, f"sliding eval coverage broken: {bad} targets scored != 1 times"
        nll_sum = float(self.nll.sum())
        return EvalResult.from_sums(nll_sum, int(self.count.numel()), float(self.bytes), seconds)


@torch.no_grad()
def score_windows(
    nll_fn: NLLFn,
    val_tokens: Tensor,
    plan: SlidingPlan,
    lo: int,
    hi: int,
    lut: ByteCounter,
    scores: StreamScores,
    *,
    batch_windows: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    bar=None,
) -> None:
    """Score windows [lo, hi) of ``plan`` into ``scores`` (this rank's part of the stream)."""
    W = plan.window_len
    offsets = torch.arange(W + 1, dtype=torch.int64)
    for a, b in window_batches(plan, lo, hi, batch_windows):
        f = int(plan.first[a])
        idx = (plan.starts[a:b, None] + offsets[None, :]).to(val_tokens.device)
        win = val_tokens[idx].to(device, non_blocking=True)
        x, y = win[:, :-1], win[:, 1:]
        with autocast_context(device, autocast_dtype):
            nll = nll_fn(x, y, f)
        assert nll.shape == (b - a, W - f), f"nll_fn returned {tuple(nll.shape)}, expected {(b - a, W - f)}"
        pos2d = (idx[:, f + 1 :] - 1).to(device)  # target index = stream index - 1
        pos = pos2d.reshape(-1)
        scores.nll.index_put_((pos,), nll.to(torch.float64).reshape(-1), accumulate=True)
        scores.count.index_put_((pos,), torch.ones_like(pos, dtype=torch.int32), accumulate=True)
        scores.bytes += target_bytes(lut, pos2d, x[:, f:], y[:, f:]).to(torch.int64).sum()
        if bar is not None:
            bar.update(b - a)


def evaluate_sliding(
    nll_fn: NLLFn,
    val_tokens: Tensor,
    seq_len: int,
    stride: int,
    lut: ByteCounter,
    *,
    batch_windows: int = 32,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    token_nll_out: Tensor | None = None,
) -> EvalResult:
    """Sliding-window val_loss / val_bpb of ``val_tokens`` (N + 1 tokens), every target once.

    ``token_nll_out`` (float [N], optional) receives the per-target NLL (all ranks' values)."""
    t0 = time.perf_counter()
    device = torch.device(device)
    plan = sliding_plan(val_tokens.numel() - 1, seq_len, stride)
    lut = lut.to(device)
    scores = StreamScores(plan.n_targets, device)
    val_tokens = val_tokens.to(device)  # one copy on the device, windows are gathered there
    lo, hi = rank_slice(plan.num_windows, rank, world_size)
    bar = _bar(hi - lo, f"sliding s{stride}", progress and rank == 0)
    try:
        score_windows(nll_fn, val_tokens, plan, lo, hi, lut, scores, batch_windows=batch_windows, device=device, autocast_dtype=autocast_dtype, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    res = scores.finish()
    if token_nll_out is not None:
        token_nll_out.copy_(scores.nll.to(token_nll_out.device, token_nll_out.dtype))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return res.with_seconds(time.perf_counter() - t0)


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="win", leave=False, dynamic_ncols=True, disable=None)
