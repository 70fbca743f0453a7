"""Per-seed values and the one-sided Welch test (pgolf.submit.stats, `pgolf stats`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from pgolf.cli import main as cli
from pgolf.submit.stats import StatsError, compare, load_sample, mean_std, parse_log, welch_improvement

NEW = [1.10, 1.12, 1.11]  # mean 1.11, sd 0.01
REF = [1.13, 1.125, 1.135]  # mean 1.13, sd 0.005


def test_welch_matches_hand_computed_values():
    r = welch_improvement(NEW, REF, 0.005)
    # By hand: se^2 = 0.01^2/3 + 0.005^2/3 = 0.000125/3; t = (0.02 - 0.005) / se;
    # dof = (0.000125/3)^2 / ((0.0001/3)^2/2 + (0.000025/3)^2/2) = 50/17.
    assert r.mean_new == pytest.approx(1.11) and r.sd_new == pytest.approx(0.01)
    assert r.mean_ref == pytest.approx(1.13) and r.sd_ref == pytest.approx(0.005)
    assert r.se == pytest.approx(math.sqrt(0.000125 / 3))
    assert r.t == pytest.approx(0.015 / math.sqrt(0.000125 / 3)) == pytest.approx(2.3237900077)
    assert r.dof == pytest.approx(50 / 17)
    assert r.p == pytest.approx(0.0522394433, rel=1e-8)  # t distribution tail at (t, 50/17)
    assert not r.passed and r.improvement == pytest.approx(0.02)
    # The same test as scipy's Welch test of ref against new + gain.
    ref_test = sps.ttest_ind(np.array(REF), np.array(NEW) + 0.005, equal_var=False, alternative="greater")
    assert r.t == pytest.approx(ref_test.statistic) and r.p == pytest.approx(ref_test.pvalue)


def test_clear_improvement_passes_and_too_small_gain_fails():
    ref = [1.2000, 1.2010, 1.1990]
    assert welch_improvement([1.1000, 1.1010, 1.0990], ref, 0.005).passed  # 0.1 nats better
    assert not welch_improvement([1.1970, 1.1980, 1.1960], ref, 0.005).passed  # 0.003 < 0.005
    with pytest.raises(StatsError, match="at least 2 values"):
        welch_improvement([1.0], ref, 0.005)
    same = welch_improvement([1.0, 1.0], [1.1, 1.1], 0.005)
    assert same.p == 0.0 and same.passed  # no variance: the 0.1 gap is certain


def test_mean_std_is_the_sample_std():
    assert mean_std([2.0, 4.0, 6.0]) == (4.0, 2.0)
    assert mean_std([3.0]) == (3.0, 0.0)


def _fake_log(path, seed, loss, bpb):
    path.write_text(
        "config:" + json.dumps({"preset": "x", "train": {"seed": seed}}) + "\n"
        f"seed:{seed}\nstep:5/5 train_loss:3.0 train_time:1500ms step_avg:300.00ms\n"
        f"step:5/5 val_loss:2.9 val_bpb:1.9 train_time:1510ms step_avg:302.00ms\n"
        "Serialized model int6: 1000 bytes (payload:2000 codec:zstd-22)\nCode size: 50 bytes\n"
        "final_int6_roundtrip val_loss:9.0 val_bpb:9.0 eval_time:120ms\nfinal_int6_roundtrip_exact val_loss:9.00000000 val_bpb:9.00000000\n"
        f"final_int6_sliding_window stride:64 val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:880ms\n"
        f"final_int6_sliding_window_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}\n"
    )


def test_parse_log_prefers_the_sliding_window_score(tmp_path):
    _fake_log(tmp_path / "log.txt", 42, 2.5, 1.5)
    f = parse_log(tmp_path / "log.txt")
    assert f.seed == 42 and f.steps == 5 and f.train_seconds == pytest.approx(1.51)
    assert f.model_bytes == 1000 and f.code_bytes == 50
    assert f.score_line == "final_int6_sliding_window_exact" and f.score == (2.5, 1.5)
    assert f.eval_seconds == pytest.approx(1.0)  # roundtrip 120 ms + sliding 880 ms
    assert f.train_curve == [(5, 3.0)] and f.val_curve == [(5, 2.9, 1.9)]


def test_gptq_calibration_counts_as_training_time(tmp_path):
    _fake_log(tmp_path / "log.txt", 1, 2.5, 1.5)
    with open(tmp_path / "log.txt", "a") as f:
        f.write("gptq_seconds:8.5 layers:66 calibration:train train_time_with_gptq:10.0s\n")
    assert parse_log(tmp_path / "log.txt").train_seconds == pytest.approx(10.0)


def test_parse_log_prefers_the_legal_ttt_score_when_there_is_one(tmp_path):
    _fake_log(tmp_path / "log.txt", 1, 2.5, 1.5)
    with open(tmp_path / "log.txt", "a") as f:
        f.write("legal_ttt mode:sgd chunk:32768 val_loss:2.4000 val_bpb:1.4000 eval_time:2000ms chunks:3 train_time:1500ms\n"
                "legal_ttt_exact val_loss:2.40000000 val_bpb:1.40000000\n")
    facts = parse_log(tmp_path / "log.txt")
    assert facts.score_line == "legal_ttt_exact" and facts.score == (2.4, 1.4)
    assert facts.eval_seconds == pytest.approx(3.0)


def test_samples_from_runs_records_and_json(tmp_path):
    for seed, loss in ((1, 2.00), (2, 2.01), (3, 1.99)):
        (tmp_path / f"run{seed}").mkdir()
        _fake_log(tmp_path / f"run{seed}" / "log.txt", seed, loss, loss * 0.6)
    record = tmp_path / "rec"
    record.mkdir()
    for seed, loss in ((4, 2.10), (5, 2.11)):
        _fake_log(record / f"train_seed{seed}.log", seed, loss, loss * 0.6)
    runs = load_sample([tmp_path / f"run{s}" for s in (1, 2, 3)], "new")
    assert runs.val_loss == [2.0, 2.01, 1.99] and runs.seeds == [1, 2, 3]
    assert load_sample([tmp_path], "new").val_loss == [2.0, 2.01, 1.99]  # the folder holding the runs
    rec = load_sample([record], "ref")
    assert rec.val_loss == [2.1, 2.11] and rec.n == 2
    (tmp_path / "ref.json").write_text(json.dumps({"val_bpb": [1.26, 1.266, 1.27]}))
    bpb_only = load_sample([tmp_path / "ref.json"], "ref")
    assert bpb_only.val_loss == [] and bpb_only.n == 3
    result, note = compare(runs, bpb_only, 0.005)
    assert result.metric == "val_bpb" and result.min_gain == pytest.approx(0.003) and "0.6" in note
    (tmp_path / "bad.json").write_text(json.dumps({"scores": [1, 2]}))
    with pytest.raises(StatsError, match="expected"):
        load_sample([tmp_path / "bad.json"], "ref")


def test_stats_cli_prints_the_test_and_exits_by_verdict(tmp_path, capsys):
    (tmp_path / "ref.json").write_text(json.dumps({"seed_results": [{"seed": s, "val_loss": v, "val_bpb": v * 0.6} for s, v in ((1, 2.2), (2, 2.21), (3, 2.19))]}))
    for seed, loss in ((1, 2.00), (2, 2.01), (3, 1.99)):
        (tmp_path / f"run{seed}").mkdir()
        _fake_log(tmp_path / f"run{seed}" / "log.txt", seed, loss, loss * 0.6)
    runs = [str(tmp_path / f"run{s}") for s in (1, 2, 3)]
    assert cli(["stats", *runs, "--against", str(tmp_path / "ref.json")]) == 0
    out = capsys.readouterr().out
    assert "PASS: p < 0.01" in out and "t = " in out and "dof = " in out and "mean 2.00000000" in out
    assert cli(["stats", *runs, "--against", str(tmp_path / "ref.json"), "--min-gain-nats", "0.5"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_two_tokenizers_are_compared_per_byte_not_per_token():
    """A vocabulary ablation: the same validation text in fewer, longer tokens has a higher loss
    per token and a lower bpb. The test must be on val_bpb (the challenge's metric), not nats per
    token, and the nats threshold is converted at the reference's bpb/nats ratio."""
    from pgolf.submit.stats import Sample, bpb_per_nat

    ln2 = math.log(2)
    ref_bpb, new_bpb = [2.895, 2.889, 2.892], [2.804, 2.815, 2.810]
    tokens_per_byte_ref, tokens_per_byte_new = 0.40, 0.36  # the new tokenizer: 10% fewer tokens
    ref = Sample("sp1024", [b * ln2 / tokens_per_byte_ref for b in ref_bpb], ref_bpb, [1, 2, 3], [])
    new = Sample("sp1536", [b * ln2 / tokens_per_byte_new for b in new_bpb], new_bpb, [1, 2, 3], [])
    assert sum(new.val_loss) > sum(ref.val_loss)  # per token the new side looks worse
    assert bpb_per_nat(ref) == pytest.approx(tokens_per_byte_ref / ln2)
    result, note = compare(new, ref, 0.005)
    assert result.metric == "val_bpb" and result.passed and result.p < 1e-3
    assert result.min_gain == pytest.approx(0.005 * tokens_per_byte_ref / ln2)
    assert "tokenise the validation text differently" in note
    assert result.p == pytest.approx(welch_improvement(new_bpb, ref_bpb, 0.005 * tokens_per_byte_ref / ln2).p)
    # one tokenizer on both sides: the test stays on nats, with no note
    same = Sample("sp1024b", [b * ln2 / tokens_per_byte_ref for b in new_bpb], new_bpb, [1, 2, 3], [])
    result, note = compare(same, ref, 0.005)
    assert result.metric == "val_loss" and note == ""
