"""The token-flip causality check: it passes for the package's legal evaluations (plain, sliding,
score-first TTT with SGD and LoRA) and fails for deliberately illegal ones, which exist only
here: TTT that trains on a chunk before scoring it, TTT on the whole stream before scoring
("pre-eval TTT"), a model with bidirectional attention and a scorer that reads the next token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pgolf.eval.causality import check_causality, sample_positions
from pgolf.eval.config import TTTConfig
from pgolf.eval.sliding import evaluate_sliding
from pgolf.eval.ttt import ScoreFirstTTT
from pgolf.model.gpt import GPT
from pgolf.model.layers import CastedLinear
from tests.test_eval_helpers import one_thread, segment_stream, synthetic_lut, tiny_cfg  # noqa: F401

L, S, N = 32, 8, 256
TTT = TTTConfig(mode="sgd", chunk_tokens=64, epochs=2, batch_seqs=2, seq_len=L)  # the recipe's lr 0.002


def scrambled_model(seed: int = 0, kernel=None) -> GPT:
    """A tiny model whose zero-initialised projections are random too, so every weight (and every
    LoRA adapter) gets a gradient: an untrained stand-in for a trained model."""
    torch.manual_seed(seed)
    model = GPT(tiny_cfg().model, kernel=kernel)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CastedLinear) and m.zero_init:
                nn.init.normal_(m.weight, std=0.05)
    return model.eval()


@pytest.fixture(scope="module")
def stream() -> torch.Tensor:
    return segment_stream(N + 1, seed=9)


@pytest.mark.parametrize("mode, ttt", [("plain", None), ("sliding", None), ("ttt", TTT),
                                       ("ttt", TTTConfig(mode="lora", chunk_tokens=64, epochs=2, batch_seqs=2, seq_len=L, lora_lr=0.1))])
def test_legal_evaluations_pass(mode: str, ttt: TTTConfig | None, stream: torch.Tensor) -> None:
    rep = check_causality(scrambled_model(), stream, synthetic_lut(), mode=mode, seq_len=L, stride=S, positions=6, seed=1, ttt_cfg=ttt)
    assert rep.passed, rep.summary()
    assert rep.max_diff_before == 0.0 and rep.noise_floor == 0.0  # CPU: bit-identical, not just close
    assert all(c.changed_from > 0 for c in rep.checks)  # every flip changed something: not vacuous
    assert len(rep.checks) == 6 and rep.as_dict()["passed"] is True


# ---- deliberately illegal evaluations (test-only) ----------------------------------------------


class TrainThenScore(ScoreFirstTTT):
    """ILLEGAL: adapts on chunk c before scoring it (C3 violated)."""

    def process_chunk(self, c: int) -> None:
        self.adapt_chunk(c)
        self.score_chunk(c)


class PreEvalTTT(ScoreFirstTTT):
    """ILLEGAL: trains on every chunk of the stream first, then scores (PR #388's "pre-eval TTT")."""

    def process_chunk(self, c: int) -> None:
        if c == 0:
            for k in range(self.n_chunks):
                self.adapt_chunk(k)
        self.score_chunk(c)


def _runner_scorer(cls, model: GPT, cfg: TTTConfig):
    def scorer(tokens: torch.Tensor) -> torch.Tensor:
        runner = cls(model, tokens, synthetic_lut(), cfg, seq_len=L, stride=S)
        runner.run()
        return runner.scores.nll.clone()

    return scorer


@pytest.mark.parametrize("cls", [TrainThenScore, PreEvalTTT])
def test_training_before_scoring_fails(cls, stream: torch.Tensor) -> None:
    model = scrambled_model()
    rep = check_causality(None, stream, None, mode="illegal-ttt", positions=6, seed=1, vocab_size=64, scorer=_runner_scorer(cls, model, TTT))
    assert not rep.passed, rep.summary()
    assert rep.max_diff_before > 1e-5
    # the legal order of the same runner class hierarchy passes on the same positions
    legal = check_causality(None, stream, None, mode="ttt", positions=6, seed=1, vocab_size=64, scorer=_runner_scorer(ScoreFirstTTT, model, TTT))
    assert legal.passed, legal.summary()


def bidirectional_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ILLEGAL attention: every position sees the whole window."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=False, enable_gqa=True)
    return y.transpose(1, 2)


@pytest.mark.parametrize("mode", ["plain", "sliding"])
def test_a_model_that_sees_the_future_fails(mode: str, stream: torch.Tensor) -> None:
    model = scrambled_model(kernel=bidirectional_sdpa)
    rep = check_causality(model, stream, synthetic_lut(), mode=mode, seq_len=L, stride=S, positions=6, seed=1)
    assert not rep.passed and sum(not c.passed for c in rep.checks) >= 5, rep.summary()


def test_a_scorer_that_reads_the_next_token_fails(stream: torch.Tensor) -> None:
    model, lut = scrambled_model(), synthetic_lut()

    def peeking_nll(x: torch.Tensor, y: torch.Tensor, first: int) -> torch.Tensor:
        return model.token_nll(torch.roll(x, -2, dims=1), y, first)  # reads the token after its target

    def scorer(tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(tokens.numel() - 1, dtype=torch.float64)
        evaluate_sliding(peeking_nll, tokens, L, S, lut, token_nll_out=out)
        return out

    rep = check_causality(None, stream, None, mode="peek", positions=6, seed=1, vocab_size=64, scorer=scorer)
    assert not rep.passed


def test_positions_are_distinct_and_leave_an_earlier_target() -> None:
    ps = sample_positions(100, 30, seed=3)
    assert len(set(ps)) == 30 and min(ps) >= 2 and max(ps) <= 100 and ps == sorted(ps)
    assert sample_positions(5, 30, seed=3) == [2, 3, 4, 5]


# ---- phased TTT (R6/R7): checked in its scoring order ------------------------------------------

from pgolf.eval.causality import make_scorer  # noqa: E402
from pgolf.eval.phased import PhasedTTT  # noqa: E402
from tests.test_eval_phased import BOS, doc_lut, doc_stream, frontier_model  # noqa: E402

PHASED = TTTConfig(mode="phased", batch_docs=3, doc_chunk=8, doc_lora_rank=4, doc_lora_alpha=8.0, doc_lora_lr=0.01,
                   doc_weight_decay=0.0, prefix_docs=6, phases=2, chunk_tokens=16, batch_seqs=2, seq_len=L, global_lr=0.05)


@pytest.fixture(scope="module")
def doc_tokens() -> torch.Tensor:
    return doc_stream(11, seed=10, lo=8, hi=40)  # 11 documents: batches of 2 + 3 x 3; phases at 3 and 6 documents


def _phased_scorer(cls, model: GPT):
    return make_scorer(model, doc_lut(), "phased", seq_len=L, ttt_cfg=PHASED, runner_cls=cls)


def test_phased_ttt_passes_in_scoring_order_and_keeps_the_documents(doc_tokens: torch.Tensor) -> None:
    model = frontier_model()
    rep = check_causality(model, doc_tokens, doc_lut(), mode="phased", seq_len=L, positions=5, seed=2, ttt_cfg=PHASED)
    assert rep.passed, rep.summary()
    assert rep.max_diff_before == 0.0 and all(c.changed_from > 0 for c in rep.checks)
    assert all(doc_tokens[c.position] != BOS and c.new_token != BOS for c in rep.checks)
    # in *stream* order the same legal run "fails": a document late in the stream is scored (and
    # adapted on) before earlier ones, so order matters, and the check must use the scoring order
    stream_order = check_causality(None, doc_tokens, None, mode="phased-stream-order", positions=5, seed=2, vocab_size=64,
                                   keep_tokens=(BOS,), scorer=lambda t: _phased_scorer(PhasedTTT, model)(t)[0])
    assert not stream_order.passed


class AdaptThenScore(PhasedTTT):
    """ILLEGAL: takes the LoRA step on a chunk before scoring it."""

    def score_and_adapt(self, lora, opt, cb, segment) -> None:
        if bool(cb.has_next.any()):
            self.adapt(lora, opt, self.forward(lora, cb), cb)
        with torch.no_grad():
            self.score(self.forward(lora, cb), cb, segment)


class SGDOnStreamPrefix(PhasedTTT):
    """ILLEGAL: the global SGD phase trains on the first documents of the *stream*, some of which
    are not scored yet."""

    def phase_documents(self, trigger):
        return torch.arange(trigger.boundary), trigger.boundary


def test_planted_look_ahead_variants_of_phased_ttt_fail(doc_tokens: torch.Tensor) -> None:
    model = frontier_model()
    rep = check_causality(None, doc_tokens, None, mode="phased", positions=4, seed=2, vocab_size=64, keep_tokens=(BOS,),
                          scorer=_phased_scorer(AdaptThenScore, model))
    assert not rep.passed and rep.max_diff_before > 1e-5, rep.summary()
    # a flip in a later chunk of a stream-prefix document that is scored only after phase 1: the
    # phase has (illegally) trained on it, and its batch-mates' earlier chunks were scored before it
    probe = PhasedTTT(model, doc_tokens, doc_lut(), PHASED, seq_len=L)
    first = probe.triggers[0]
    late = [int(d) for q in range(first.after_batch + 1, len(probe.queue)) for d in probe.queue[q] if int(d) < first.boundary]
    assert late, "the fixture must have a stream-prefix document scored after phase 1"
    doc = max(late, key=lambda d: int(probe.docs.lengths[d]))
    assert int(probe.docs.lengths[doc]) > PHASED.doc_chunk + 3
    p = int(probe.docs.starts[doc]) + PHASED.doc_chunk + 3  # in its chunk 1
    bad = check_causality(None, doc_tokens, None, mode="phased", at=[p], vocab_size=64, keep_tokens=(BOS,),
                          scorer=_phased_scorer(SGDOnStreamPrefix, model))
    assert not bad.passed, bad.summary()
    good = check_causality(None, doc_tokens, None, mode="phased", at=[p], vocab_size=64, keep_tokens=(BOS,),
                           scorer=_phased_scorer(PhasedTTT, model))
    assert good.passed, good.summary()
