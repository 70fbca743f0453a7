"""The artifact end to end: build, reload into a fresh model, report, size prediction and the
``pgolf export`` / ``pgolf inspect --artifact`` commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.cli import main
from pgolf.config import load_config, to_dict
from pgolf.data.shards import write_shard
from pgolf.model.gpt import build_model
from pgolf.quant.container import ChunkPlan, encode_artifact, write_bytes_atomic
from pgolf.quant.export import QTensor, dequantize_state_dict, dtype_name, quantize_state_dict
from pgolf.quant.predict import predict_artifact_bytes, preflight
from pgolf.quant.report import artifact_report
from pgolf.quant.artifact import artifact_meta, build_artifact, load_artifact_model

TINY = [("model.num_layers", 2), ("model.model_dim", 64), ("model.num_heads", 4), ("model.num_kv_heads", 2), ("model.xsa_last_n", 1),
        ("model.bigram_dim", 32), ("model.ve_dim", 32), ("quant.small_numel", 1024), ("train.train_seq_len", 32),
        ("eval.max_val_tokens", 2048), ("quant.gptq_calib_seqs", 4)]


def _trained_like(cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("codec, packing", [("zstd-22", "auto"), ("auto", "auto"), ("zlib-9", "int8")])
def test_build_and_reload_into_a_fresh_model(tmp_path: Path, codec: str, packing: str) -> None:
    cfg = load_config("pr401", "cpu", TINY + [("quant.codec", codec), ("quant.packing", packing)])
    model = _trained_like(cfg)
    state = model.state_dict()
    path = tmp_path / "final_model.pgolf"
    report, qtensors = build_artifact(state, cfg.model, cfg.quant, path, code_bytes=1234)
    assert report.model_bytes == path.stat().st_size and report.total_bytes == report.model_bytes + 1234
    assert sum(report.choices.values()) == len(state)
    fresh, meta = load_artifact_model(path)
    expected = dequantize_state_dict(qtensors)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k].to(v.dtype)), k
    assert meta["code_bytes"] == 1234 and meta["gptq"] is False


def test_report_totals_and_cli_inspect(tmp_path: Path, capsys) -> None:
    cfg = load_config("pr401", "cpu", TINY + [("quant.codec", "auto")])
    path = tmp_path / "a.pgolf"
    build_artifact(_trained_like(cfg).state_dict(), cfg.model, cfg.quant, path, code_bytes=1000)
    rep = artifact_report(path)
    t = rep["totals"]
    assert t["model_bytes"] == path.stat().st_size and t["entropy_bound_bytes"] > 0
    assert t["entropy_bound_bytes"] <= t["entropy_bound_order0_bytes"]  # contexts never raise the bound
    rows = {r["name"]: r for r in rep["tensors"]}
    fc = rows["blocks.0.mlp.fc.weight"]
    assert fc["fmt"] == "int6:max:full" and fc["packing"] in ("raw", "bitpack", "entropy") and 0 < fc["bits_per_weight"] < 8
    assert rows["blocks.0.attn_scale"]["fmt"] == "fp32"
    assert abs(sum(r["stored_bytes"] for r in rep["tensors"]) + t["header_bytes"] - t["model_bytes"]) < 2
    assert main(["inspect", "--artifact", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["totals"]["model_bytes"] == t["model_bytes"] and "entropy_bound_bytes" in out["totals"]
    assert main(["inspect", "--artifact", str(path)]) == 0
    text = capsys.readouterr().out
    assert "blocks.0.mlp.fc.weight" in text and "entropy bound" in text and "fits" in text
    (tmp_path / "bad.pgolf").write_bytes(b"\x80\x04junk")
    assert main(["inspect", "--artifact", str(tmp_path / "bad.pgolf")]) == 2
    assert "pickle" in capsys.readouterr().err


def test_prediction_is_measured_and_warns_over_budget() -> None:
    cfg = load_config("pr401", "cpu", [("quant.small_numel", 4096)])
    pred = predict_artifact_bytes(cfg, code_bytes=50_000)
    int6 = pred["by_format"]["int6:max:full"]
    assert 4.5 < int6["bits_per_weight"] < 6.0 and int6["params"] == 1_630_208
    assert pred["by_format"]["fp32"]["bits_per_weight"] == 32.0
    assert pred["artifact_bytes"] == pred["model_bytes"] + 50_000 and pred["fits"] and pred["calibration"] is None
    fewer = predict_artifact_bytes(load_config("pr401", "cpu", [("quant.small_numel", 4096), ("quant.mlp_format", "int4:max:full")]), 50_000)
    assert fewer["model_bytes"] < pred["model_bytes"]
    lines: list[str] = []
    small = load_config("pr401", "cpu", [("quant.small_numel", 4096), ("quant.budget_bytes", 500_000)])
    assert not preflight(small, 50_000, lines.append)["fits"]
    assert any(line.startswith("WARNING: the predicted artifact") for line in lines)


def test_prediction_is_calibrated_on_the_record_of_the_same_shape() -> None:
    pred = predict_artifact_bytes(load_config("pr401"), code_bytes=75_000)
    assert "#374" in pred["calibration"]["source"] and 0.6 < pred["calibration"]["factor"] < 1.0
    assert pred["model_bytes_calibrated"] < pred["model_bytes"]
    assert pred["fits"] and not pred["fits_upper"]  # a Gaussian pr401 would not fit; the record-like one does


def _run_dir(tmp_path: Path, tokenizer: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    write_shard(data / "fineweb_train_000000.bin", rng.integers(0, 1024, 20_000))
    write_shard(data / "fineweb_val_000000.bin", rng.integers(0, 1024, 4_000))
    cfg = load_config("pr401", "cpu", TINY + [("data.path", str(data)), ("data.tokenizer", str(tokenizer))])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    model = _trained_like(cfg)
    qts = [QTensor(k, tuple(v.shape), dtype_name(v.dtype), "raw", v.contiguous()) for k, v in model.state_dict().items()]
    blob = encode_artifact(qts, artifact_meta(cfg.model, {"raw": True, "preset": "pr401"}), ChunkPlan(default_codec="none"))
    write_bytes_atomic(run / "final_model.raw.pgolf", blob)
    return run


def test_export_command_re_exports_with_gptq_and_evaluates(tmp_path: Path, shared_tokenizer: Path, capsys) -> None:
    run = _run_dir(tmp_path, shared_tokenizer)
    out = tmp_path / "x.pgolf"
    args = ["export", "--run", str(run), "--out", str(out), "--json", "--eval", "--eval-raw", "--set", "quant.packing=bitpack",
            "--set", "quant.gptq=full", "--set", "quant.codec=lzma"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model_bytes"] == out.stat().st_size and res["gptq_layers"] >= 10 and "train shards" in res["calibration"]
    assert set(res["choices"]) <= {"bitpack+lzma", "raw+lzma"}
    assert abs(res["quant_gap"]) < 0.5 and res["val_bpb_roundtrip"] > 0
    assert main(["export", "--run", str(run), "--out", str(out), "--set", "model.num_layers=3"]) == 2
    assert "quant.*" in capsys.readouterr().err


def test_gptq_artifact_matches_rounding_where_no_hessian(tmp_path: Path) -> None:
    cfg = load_config("pr401", "cpu", TINY)
    state = _trained_like(cfg).state_dict()
    plain = {q.name: q for q in quantize_state_dict(state, cfg.quant)}
    h = torch.eye(64) + 0.5
    with_h = {q.name: q for q in quantize_state_dict(state, cfg.quant, {"blocks.0.attn.c_q.weight": h})}
    assert torch.equal(with_h["blocks.1.attn.c_q.weight"].values, plain["blocks.1.attn.c_q.weight"].values)
    assert not torch.equal(with_h["blocks.0.attn.c_q.weight"].values, plain["blocks.0.attn.c_q.weight"].values)
    assert torch.equal(with_h["blocks.0.attn.c_q.weight"].scale, plain["blocks.0.attn.c_q.weight"].scale)
