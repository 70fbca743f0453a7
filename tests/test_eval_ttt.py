"""Score-first test-time training: lr = 0 reproduces the sliding eval bit for bit, the artifact's
model and file are never modified, chunking and the schedule follow the recipe, LoRA trains
adapters only, and adaptation on a trained model helps."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from pgolf.errors import ConfigError
from pgolf.eval.config import TTTConfig
from pgolf.eval.sliding import evaluate_sliding
from pgolf.eval.ttt import LoRALinear, ScoreFirstTTT, evaluate_ttt, prepare_ttt_model
from tests.test_eval_helpers import one_thread, segment_stream, synthetic_lut, tiny_cfg, tiny_model, train_tiny  # noqa: F401

L, S = 32, 8


def _cfg(**kw) -> TTTConfig:
    base = dict(mode="sgd", chunk_tokens=96, epochs=2, batch_seqs=2, seq_len=L)
    base.update(kw)
    return TTTConfig(**base)


@pytest.mark.parametrize("mode", ["sgd", "lora"])
@pytest.mark.parametrize("chunk", [40, 96, 1000])
def test_zero_learning_rate_equals_the_sliding_eval_exactly(mode: str, chunk: int) -> None:
    model, lut = tiny_model(), synthetic_lut()
    stream = segment_stream(301, seed=2)
    out_sl = torch.zeros(300, dtype=torch.float64)
    out_tt = torch.zeros(300, dtype=torch.float64)
    sl = evaluate_sliding(model.token_nll, stream, L, S, lut, batch_windows=7, token_nll_out=out_sl)
    o = evaluate_ttt(model, stream, lut, _cfg(mode=mode, chunk_tokens=chunk, lr=0.0, lora_lr=0.0), seq_len=L, stride=S, batch_windows=7, token_nll_out=out_tt)
    assert torch.equal(out_sl, out_tt)
    assert (o.result.nll_sum, o.result.targets, o.result.bytes) == (sl.nll_sum, sl.targets, sl.bytes)
    assert o.chunks == math.ceil(300 / chunk) and o.trained_chunks == o.chunks - 1
    assert o.optimizer_steps > 0 or o.chunks == 1  # the training path really ran


def test_the_artifact_model_and_file_are_never_modified(tmp_path) -> None:
    from pgolf.quant.artifact import build_artifact, load_artifact_model

    cfg = tiny_cfg()
    model = tiny_model()
    path = tmp_path / "final_model.pgolf"
    build_artifact(model.state_dict(), cfg.model, cfg.quant, path, code_bytes=0)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded, _meta = load_artifact_model(path)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    lut = synthetic_lut()
    stream = segment_stream(301, seed=4)
    plain = evaluate_sliding(loaded.token_nll, stream, L, S, lut)
    for mode in ("sgd", "lora"):
        # (an untrained model has zero output projections, so only adapters on them get gradients)
        o = evaluate_ttt(loaded, stream, lut, _cfg(mode=mode, lr=0.05, lora_lr=0.5, lora_targets=["c_v", "mlp.proj"]), seq_len=L, stride=S)
        assert o.result.nll_sum != plain.nll_sum  # it did adapt
    after = loaded.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, LoRALinear) for m in loaded.modules())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert evaluate_sliding(loaded.token_nll, stream, L, S, lut).nll_sum == plain.nll_sum


def test_windows_belong_to_the_chunk_of_their_first_scored_target_and_training_stays_in_it() -> None:
    model, lut = tiny_model(), synthetic_lut()
    stream = segment_stream(301, seed=5)
    runner = ScoreFirstTTT(model, stream, lut, _cfg(chunk_tokens=50), seq_len=L, stride=S)
    events: list[tuple[str, int]] = []
    trained_targets: list[tuple[int, int]] = []
    score, adapt = runner.score_chunk, runner.adapt_chunk
    runner.score_chunk = lambda c: (events.append(("score", c)), score(c))[1]
    runner.adapt_chunk = lambda c: (events.append(("adapt", c)), trained_targets.append(runner.chunk_range(c)), adapt(c))[2]
    runner.run()
    n = runner.n_chunks
    assert n == 6 and events == [e for c in range(n) for e in (("score", c), ("adapt", c))][:-1]  # last chunk: no adapt
    firsts = runner.plan.first_target()
    for c, (w_lo, w_hi) in enumerate(runner.chunk_windows):
        assert all(c * 50 <= int(firsts[w]) < (c + 1) * 50 for w in range(w_lo, w_hi))
    assert [hi for _, hi in trained_targets] == [50 * (c + 1) for c in range(n - 1)]


def test_cosine_learning_rate_across_chunks() -> None:
    runner = ScoreFirstTTT(tiny_model(), segment_stream(301), synthetic_lut(), _cfg(chunk_tokens=60, lr=0.002), seq_len=L, stride=S)
    assert runner.n_chunks == 5
    lrs = [runner.chunk_lr(c) for c in range(5)]
    assert lrs[0] == pytest.approx(0.002) and lrs[2] == pytest.approx(0.001) and lrs[4] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_lora_trains_only_the_adapters_of_the_named_linears() -> None:
    model = tiny_model()
    adapted, params = prepare_ttt_model(model, _cfg(mode="lora", lora_targets=["c_q", "mlp.proj"], lora_rank=4))
    wrapped = [n for n, m in adapted.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == ["blocks.0.attn.c_q", "blocks.0.mlp.proj", "blocks.1.attn.c_q", "blocks.1.mlp.proj"]
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == {f"{w}.lora_{ab}" for w in wrapped for ab in "ab"}
    assert sum(p.numel() for p in params) == sum(4 * (m.base.in_features + m.base.out_features) for m in adapted.modules() if isinstance(m, LoRALinear))
    with pytest.raises(ConfigError, match="ttt.lora_targets: 'c_z' matches no linear"):
        prepare_ttt_model(model, _cfg(mode="lora", lora_targets=["c_z"]))


@pytest.mark.parametrize(
    "kw, match",
    [(dict(mode="adam"), "ttt.mode"), (dict(chunk_tokens=0), "chunk_tokens"), (dict(lr=-1.0), "ttt.lr"),
     (dict(momentum=1.0), "momentum"), (dict(mode="lora", lora_targets=[]), "lora_targets")],
)
def test_bad_ttt_settings_are_config_errors(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TTTConfig(**kw).validate()


def test_score_first_ttt_helps_a_trained_model_on_a_shifted_stream() -> None:
    """Adapt to a validation stream whose key -> continuation table differs from training."""
    model = train_tiny(tiny_model(seed=1))
    lut = synthetic_lut()
    table = torch.randint(16, 64, (16, 12), generator=torch.Generator().manual_seed(999))
    keys = torch.randint(1, 16, (200,), generator=torch.Generator().manual_seed(3))
    stream = torch.cat((keys[:, None], table[keys]), dim=1).reshape(-1)[: 20 * 64 + 1]
    plain = evaluate_sliding(model.token_nll, stream, L, S, lut)
    o = evaluate_ttt(model, stream, lut, _cfg(chunk_tokens=256, epochs=3, batch_seqs=4, lr=0.05), seq_len=L, stride=S)
    assert o.result.val_bpb < plain.val_bpb
