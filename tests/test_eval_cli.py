"""``pgolf eval`` and ``pgolf audit`` on a real artifact file, the final evaluations of a run
(log lines and summary keys), the torchrun split, and the 8xH100 eval-time estimate."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pgolf.cli import main
from pgolf.data.shards import write_shard
from pgolf.data.tokenizer import train_tokenizer
from pgolf.eval.budget import OFFICIAL_VAL_TARGETS, estimate_8xh100, forward_cost, sliding_flops
from pgolf.eval.config import TTTConfig
from pgolf.eval.sliding import sliding_plan
from tests.conftest import REPO
from tests.test_eval_helpers import one_thread, segment_stream, tiny_cfg  # noqa: F401

VOCAB = 320
SEQ = 32


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> dict[str, str]:
    """A tokenizer of 320 pieces, an artifact of a tiny 320-token model, a 2-shard val split."""
    from pgolf.model.gpt import build_model
    from pgolf.quant.artifact import build_artifact

    tmp = tmp_path_factory.mktemp("evalcli")
    rnd = random.Random(0)
    texts = [" ".join("".join(rnd.choice("abcd") for _ in range(rnd.randint(1, 6))) for _ in range(50)) for _ in range(100)]
    tok = train_tokenizer(texts, tmp / "tok.model", vocab_size=VOCAB)
    cfg = tiny_cfg([("model.vocab_size", VOCAB)])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    artifact = tmp / "final_model.pgolf"
    build_artifact(model.state_dict(), cfg.model, cfg.quant, artifact, code_bytes=0, meta_extra={"eval_seq_len": SEQ, "train_seq_len": SEQ})
    stream = segment_stream(700, seed=1).numpy() + 4  # ids 4..67: normal pieces
    write_shard(tmp / "fineweb_val_000000.bin", stream[:400].astype(np.uint16))
    write_shard(tmp / "fineweb_val_000001.bin", stream[400:].astype(np.uint16))
    return {"artifact": str(artifact), "val": str(tmp / "fineweb_val_*.bin"), "tokenizer": str(tok), "dir": str(tmp)}


def _base(b: dict[str, str]) -> list[str]:
    return ["--artifact", b["artifact"], "--val", b["val"], "--tokenizer", b["tokenizer"]]


def test_eval_json_reports_standard_sliding_ttt_and_the_estimate(bundle, capsys) -> None:
    code = main(["eval", *_base(bundle), "--seq-len", str(SEQ), "--stride", "8", "--json",
                 "--ttt", "sgd", "--ttt-chunk-tokens", "160", "--ttt-lr", "0"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    n = (699 // SEQ) * SEQ  # the stream is cut to whole windows (+1 token)
    assert out["standard"]["targets"] == out["sliding"]["targets"] == out["ttt"]["targets"] == n
    assert out["standard"]["bytes"] == out["sliding"]["bytes"] == out["ttt"]["bytes"]
    assert out["sliding"]["windows"] == sliding_plan(n, SEQ, 8).num_windows
    assert out["ttt"]["val_bpb"] == out["sliding"]["val_bpb"]  # lr 0: identical
    assert out["ttt"]["chunks"] == -(-n // 160)
    for part in ("standard", "sliding", "ttt"):
        assert out[part]["eval_seconds"] > 0
    est = out["estimate_8xh100"]
    assert est["fits"] is True and est["val_targets"] == OFFICIAL_VAL_TARGETS and "989 TFLOP/s" in est["assumption"]
    assert est["ttt_seconds"] > est["sliding_seconds"] > est["standard_seconds"] > 0


def test_eval_table_output(bundle, capsys) -> None:
    assert main(["eval", *_base(bundle), "--stride", "16"]) == 0
    text = capsys.readouterr().out
    assert "standard  val_loss:" in text and "sliding   stride:16" in text and "eval_estimate_8xh100" in text


def test_eval_rejects_a_stride_longer_than_the_window(bundle, capsys) -> None:
    assert main(["eval", *_base(bundle), "--stride", "64"]) == 2
    assert "--stride 64: must be between 1 and the sequence length 32" in capsys.readouterr().err


def test_audit_causality_passes_on_a_legal_artifact(bundle, capsys) -> None:
    code = main(["audit", "causality", *_base(bundle), "--positions", "3", "--stride", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["passed"] is True
    assert [m["mode"] for m in out["modes"]] == ["plain", "sliding", "ttt"]
    assert out["targets"] == 4 * SEQ and out["ttt"]["chunk_tokens"] == SEQ  # default: 4 windows, 4 chunks
    assert all(m["positions"] == 3 and m["max_diff_before"] == 0.0 for m in out["modes"])


def test_audit_hands_other_arguments_to_the_record_audit(monkeypatch, capsys) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("pgolf.submit.audit")
    fake.main = lambda argv: seen.append(list(argv)) or 3
    monkeypatch.setitem(sys.modules, "pgolf.submit.audit", fake)
    assert main(["audit", "records/my_run", "--strict", "--json"]) == 3
    assert seen == [["records/my_run", "--strict", "--json"]]
    monkeypatch.setitem(sys.modules, "pgolf.submit.audit", None)  # as if the module were missing
    assert main(["audit", "records/my_run"]) == 2
    assert "pgolf.submit.audit" in capsys.readouterr().err


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, line: str, console: bool = True) -> None:
        self.lines.append(line)


def test_final_evaluations_log_the_challenge_lines_and_return_the_summary_keys(bundle) -> None:
    from pgolf.cli.eval import load_eval_inputs
    from pgolf.eval.standard import evaluate_standard
    from pgolf.eval.suite import final_evaluations

    model, _meta, lut, seq, tokens = load_eval_inputs(SimpleNamespace(**bundle, seq_len=SEQ, max_tokens=0), torch.device("cpu"))
    cfg = tiny_cfg([("model.vocab_size", VOCAB), ("train.train_seq_len", SEQ), ("eval.sliding_stride", 8),
                    ("ttt.mode", "sgd"), ("ttt.chunk_tokens", 200), ("train.progress", False), ("train.autocast", "off")])
    cfg.profile = "8xh100"  # the estimate line is written for runs of the 8xh100 profile
    ctx = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), is_main=True, distributed=False)
    log = _Log()
    trainer = SimpleNamespace(
        cfg=cfg, ctx=ctx, logger=log, val_tokens=tokens, lut=lut, amp_dtype=None,
        validate=lambda m, progress=True: evaluate_standard(m.token_nll, tokens, SEQ, lut, batch_tokens=256, device=ctx.device),
    )
    out = final_evaluations(model, trainer, "int6")
    for key in ("val_bpb_roundtrip", "val_bpb_sliding", "val_loss_sliding", "sliding_stride", "eval_seconds_sliding",
                "val_targets_sliding", "val_bpb_ttt", "eval_seconds_ttt", "eval_estimate_8xh100_seconds"):
        assert key in out, key
    assert out["sliding_stride"] == 8 and out["val_targets_sliding"] == out["val_targets_roundtrip"] == tokens.numel() - 1
    # each evaluation is announced with its estimated time (no training rate here: "unknown")
    estimates = [line for line in log.lines if line.startswith("eval_estimate pass:")]
    assert [e.split(" ")[1] for e in estimates] == ["pass:roundtrip", "pass:sliding"] and all("seconds:unknown" in e for e in estimates)
    lines = [line for line in log.lines if not line.startswith("eval_estimate pass:")]
    names = [line.split(" ")[0] for line in lines]
    assert names == ["final_int6_roundtrip", "final_int6_roundtrip_exact", "final_int6_sliding_window",
                     "final_int6_sliding_window_exact", "legal_ttt", "legal_ttt_exact", "eval_estimate_8xh100"]
    exact = lines[3]
    assert exact == f"final_int6_sliding_window_exact val_loss:{out['val_loss_sliding']:.8f} val_bpb:{out['val_bpb_sliding']:.8f}"
    assert lines[2].startswith("final_int6_sliding_window stride:8 val_loss:") and "eval_time:" in lines[2]


@pytest.mark.slow
def test_two_ranks_give_the_single_process_result(bundle, tmp_path) -> None:
    """torchrun --nproc_per_node=2 (gloo): the same sliding result bit for bit, TTT to fp tolerance."""
    args = ["-m", "pgolf", "eval", *_base(bundle), "--stride", "8", "--json", "--device", "cpu",
            "--ttt", "sgd", "--ttt-chunk-tokens", "160", "--ttt-lr", "0.01"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    one = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout[two.stdout.index("{"):])
    assert b["world_size"] == 2
    assert b["sliding"]["val_loss"] == a["sliding"]["val_loss"] and b["sliding"]["val_bpb"] == a["sliding"]["val_bpb"]
    assert (b["sliding"]["targets"], b["sliding"]["bytes"]) == (a["sliding"]["targets"], a["sliding"]["bytes"])
    assert b["standard"]["val_bpb"] == pytest.approx(a["standard"]["val_bpb"], rel=1e-12)
    assert b["ttt"]["val_bpb"] == pytest.approx(a["ttt"]["val_bpb"], rel=1e-5)
    assert b["ttt"]["val_bpb"] != a["sliding"]["val_bpb"]  # it adapted


# ---- the 8xH100 estimate ----------------------------------------------------------------------


def test_frozen_calibration_rates_equal_their_recomputation() -> None:
    from pgolf.config import load_config
    from pgolf.eval.budget import EVAL_FLOPS_PER_SECOND, TTT_TRAIN_FLOPS_PER_SECOND, reference_rates

    eval_rate, train_rate = reference_rates(load_config("pr401", "8xh100").model)
    assert EVAL_FLOPS_PER_SECOND == pytest.approx(eval_rate, rel=1e-12)
    assert TTT_TRAIN_FLOPS_PER_SECOND == pytest.approx(train_rate, rel=1e-12)


def test_flop_count_of_the_pr401_model_and_the_calibration() -> None:
    from pgolf.config import load_config

    ref = load_config("pr401", "8xh100").model
    cost = forward_cost(ref, 2048)
    assert cost.head == 2 * 512 * 1024  # tied LM head: one 512 x 1024 matmul per scored position
    windows = sliding_plan(OFFICIAL_VAL_TARGETS, 2048, 64).num_windows
    assert sliding_flops(ref, OFFICIAL_VAL_TARGETS, 2048, 64) == windows * cost.body + OFFICIAL_VAL_TARGETS * cost.head
    est = estimate_8xh100(ref, 2048, 64, TTTConfig(mode="sgd"))
    assert est.sliding_s == pytest.approx(76.0) and est.ttt_s == pytest.approx(410.0)  # the calibration points
    assert 0.2 < est.eval_mfu < 0.5 and est.fits
    slower = estimate_8xh100(ref, 2048, 8)  # stride 8: about 8x the windows, over the 600 s limit
    assert slower.sliding_s == pytest.approx(8 * est.sliding_s, rel=0.01) and not slower.fits


def test_a_training_run_ends_with_the_sliding_and_ttt_lines(demo_dir, tmp_path) -> None:
    from pgolf.config import load_config
    from pgolf.train.run import run_training
    from tests.conftest import TINY_RUN

    cfg = load_config("baseline", "cpu", TINY_RUN + [("data.path", str(demo_dir)), ("eval.max_val_tokens", 1024),
                                                      ("eval.sliding_stride", 16), ("ttt.mode", "sgd"), ("ttt.chunk_tokens", 512)])
    s = run_training(cfg, tmp_path / "run")
    assert s["val_targets_sliding"] == s["val_targets_ttt"] == s["val_targets_roundtrip"] == 1024
    assert s["sliding_stride"] == 16 and "eval_estimate_8xh100_fits" not in s  # estimate: 8xh100 profile only
    log = (tmp_path / "run" / "log.txt").read_text()
    for name in ("final_int8_zlib_sliding_window stride:16 ", "final_int8_zlib_sliding_window_exact val_loss:",
                 "legal_ttt_exact val_loss:"):
        assert name in log, name
    assert "eval_estimate_8xh100" not in log
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["val_bpb_sliding"] == s["val_bpb_sliding"] and saved["val_bpb_ttt"] == s["val_bpb_ttt"]


def test_the_estimate_scores_the_official_split_under_the_models_tokenizer():
    """The same 50,000 documents are 62.0M SP1024 targets but 40.5M SP8192 ones (frontier.md 1.1):
    an estimate for an SP8192 model on the SP1024 count would be 53% too slow."""
    from pgolf.config import load_config
    from pgolf.eval.budget import estimate_8xh100

    assert estimate_8xh100(load_config("pr401").model, 2048).n_targets == 62_021_632
    assert estimate_8xh100(load_config("pr1218").model, 2048).n_targets == 45_508_608
    sp8192 = load_config("pr1394").model
    assert estimate_8xh100(sp8192, 2048).n_targets == 40_540_160
    assert estimate_8xh100(sp8192, 2048, caseops=True).n_targets == 47_851_520
    assert estimate_8xh100(sp8192, 2048).standard_s < estimate_8xh100(sp8192, 2048, n_targets=62_021_632).standard_s
