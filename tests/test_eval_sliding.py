"""Exact sliding-window evaluation: coverage on hand-made streams, context, batching and rank
splits, equality with the standard eval at stride = seq_len, and the gain on a trained model."""

from __future__ import annotations

import pytest
import torch

from pgolf.errors import ConfigError
from pgolf.eval.bpb import ByteLUT
from pgolf.eval.sliding import StreamScores, evaluate_sliding, rank_slice, score_windows, sliding_plan
from pgolf.eval.standard import evaluate_standard
from tests.test_eval_helpers import one_thread, segment_stream, synthetic_lut, tiny_model, train_tiny  # noqa: F401 (autouse fixture)

# (seq_len L, stride S, targets N): N divisible by S or not, N - L divisible or not, N < L, N = L,
# S = L, S = 1.
CASES = [(8, 8, 32), (8, 4, 32), (8, 3, 32), (8, 3, 33), (16, 5, 100), (16, 16, 7), (16, 4, 16),
         (16, 1, 40), (7, 3, 8), (64, 64, 1000), (10, 7, 11), (32, 32, 33)]


@pytest.mark.parametrize("L, S, N", CASES)
def test_plan_scores_every_target_exactly_once_with_the_longest_context(L: int, S: int, N: int) -> None:
    plan = sliding_plan(N, L, S)
    W = plan.window_len
    assert W == min(L, N)
    seen = torch.zeros(N, dtype=torch.int64)
    for w in range(plan.num_windows):
        ws = int(plan.starts[w])
        lo, hi = plan.scored_range(w)
        assert 0 <= ws and ws + W <= N  # the window lies inside the stream (it needs v[ws + W])
        assert hi == ws + W  # a window ends at its last scored target: nothing after it is read
        assert hi - lo <= (W if w == 0 else S)  # the first window scores all of it, later ones <= S
        seen[lo:hi] += 1
        for i in range(lo, hi):
            context = i - ws  # tokens before the input of target i inside its window
            assert context == i if w == 0 else context >= W - S
    assert torch.equal(seen, torch.ones(N, dtype=torch.int64)), "a target was skipped or scored twice"
    expected_windows = 1 if N <= L else 1 + -(-(N - L) // S)
    assert plan.num_windows == expected_windows and plan.tokens_processed == expected_windows * W


def test_plan_formula_matches_pr201_when_the_stream_divides() -> None:
    plan = sliding_plan(2048 + 10 * 64, 2048, 64)
    assert plan.starts.tolist() == [64 * k for k in range(11)]
    assert plan.first.tolist() == [0] + [2048 - 64] * 10


@pytest.mark.parametrize("L, S", [(0, 1), (8, 0), (8, 9), (8, -1)])
def test_bad_stride_or_length_is_a_config_error(L: int, S: int) -> None:
    with pytest.raises(ConfigError, match="sliding eval"):
        sliding_plan(100, L, S)


def _identity_lut(n: int) -> ByteLUT:
    return ByteLUT(torch.ones(n, dtype=torch.int16), torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool))


def _target_echo(x: torch.Tensor, y: torch.Tensor, first: int) -> torch.Tensor:
    """A fake model whose 'NLL' of a target is the target's own token id; it also checks that
    every window is a contiguous slice of the stream."""
    assert torch.equal(y[:, :-1], x[:, 1:])
    return y[:, first:].to(torch.float32)


@pytest.mark.parametrize("L, S, N", CASES)
@pytest.mark.parametrize("batch_windows", [1, 3, 32])
def test_evaluation_scores_each_target_once_at_its_own_index(L: int, S: int, N: int, batch_windows: int) -> None:
    stream = torch.arange(N + 1, dtype=torch.int64)  # token = stream index, so the NLL names the target
    out = torch.zeros(N, dtype=torch.float64)
    res = evaluate_sliding(_target_echo, stream, L, S, _identity_lut(N + 1), batch_windows=batch_windows, token_nll_out=out)
    assert torch.equal(out, torch.arange(1, N + 1, dtype=torch.float64))
    assert res.targets == N and res.bytes == N and res.nll_sum == N * (N + 1) / 2


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_rank_shares_tile_the_stream(world_size: int) -> None:
    N, L, S = 203, 16, 5
    stream = torch.arange(N + 1, dtype=torch.int64)
    plan = sliding_plan(N, L, S)
    scores = StreamScores(N, "cpu")  # one shared vector stands in for the all-reduce
    for rank in range(world_size):
        lo, hi = rank_slice(plan.num_windows, rank, world_size)
        score_windows(_target_echo, stream, plan, lo, hi, _identity_lut(N + 1), scores, batch_windows=4, device=torch.device("cpu"))
    res = scores.finish()
    assert res.targets == N and torch.equal(scores.nll, torch.arange(1, N + 1, dtype=torch.float64))


def test_double_scoring_is_caught() -> None:
    N, L, S = 40, 8, 4
    plan = sliding_plan(N, L, S)
    scores = StreamScores(N, "cpu")
    stream = torch.arange(N + 1, dtype=torch.int64)
    for lo, hi in [(0, plan.num_windows), (plan.num_windows - 1, plan.num_windows)]:  # the tail twice
        score_windows(_target_echo, stream, plan, lo, hi, _identity_lut(N + 1), scores, batch_windows=4, device=torch.device("cpu"))
    with pytest.raises(AssertionError, match="coverage"):
        scores.finish()


def test_stride_equal_to_seq_len_is_the_standard_eval() -> None:
    model, lut = tiny_model(), synthetic_lut()
    stream = segment_stream(8 * 32 + 1, seed=7)
    std = evaluate_standard(model.token_nll, stream, 32, lut, batch_tokens=96, device=torch.device("cpu"))
    sl = evaluate_sliding(model.token_nll, stream, 32, 32, lut, batch_windows=5)
    assert (sl.targets, sl.bytes) == (std.targets, std.bytes) == (256, int(lut.target_bytes(stream[:-1], stream[1:]).sum()))
    assert sl.nll_sum == pytest.approx(std.nll_sum, rel=1e-12, abs=1e-9)
    assert sl.val_bpb == pytest.approx(std.val_bpb, rel=1e-12)


def test_result_does_not_depend_on_the_batch_size() -> None:
    model, lut = tiny_model(), synthetic_lut()
    stream = segment_stream(301, seed=3)
    a = evaluate_sliding(model.token_nll, stream, 32, 8, lut, batch_windows=1)
    b = evaluate_sliding(model.token_nll, stream, 32, 8, lut, batch_windows=16)
    assert a.nll_sum == b.nll_sum and a.bytes == b.bytes


def test_lm_head_runs_only_on_scored_positions() -> None:
    model, lut = tiny_model(), synthetic_lut()
    scored: list[int] = []

    def counting(x: torch.Tensor, y: torch.Tensor, first: int) -> torch.Tensor:
        out = model.token_nll(x, y, first)
        scored.append(out.numel())
        return out

    stream = segment_stream(200 + 1, seed=1)
    evaluate_sliding(counting, stream, 32, 8, lut, batch_windows=4)
    assert sum(scored) == 200


def test_sliding_is_no_worse_than_standard_on_a_trained_model() -> None:
    model = train_tiny(tiny_model(seed=1))
    lut = synthetic_lut()
    stream = segment_stream(32 * 40 + 1, seed=11)  # validation: a different stream of the same kind
    std = evaluate_standard(model.token_nll, stream, 32, lut, batch_tokens=1024, device=torch.device("cpu"))
    sl = evaluate_sliding(model.token_nll, stream, 32, 8, lut)
    assert sl.targets == std.targets and sl.bytes == std.bytes
    assert std.val_loss < 2.0, "the tiny model did not learn the synthetic task"
    assert sl.val_bpb <= std.val_bpb
