"""GPTQ lowers a layer's output error on the export's own grid; calibration can never read
validation tokens."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.config import load_config
from pgolf.data.config import DataConfig
from pgolf.data.shards import write_shard
from pgolf.errors import DataError
from pgolf.model.gpt import build_model
from pgolf.quant.calib import SelfGenerated, TrainTokens
from pgolf.quant.config import QuantConfig
from pgolf.quant.formats import parse_format, quantize_rows
from pgolf.quant.gptq import collect_hessians, gptq_quantize


def _correlated_layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cols, rows, n = 128, 96, 4096
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols) * 0.3
    x = torch.randn(n, cols, generator=g) @ mix * torch.linspace(0.2, 3.0, cols)  # correlated, uneven columns
    w = torch.randn(rows, cols, generator=g) * 0.05
    return x, w


@pytest.mark.parametrize("fmt_spec, act_order, block", [("int4:max:full", True, 32), ("int6:max:full", False, 128), ("int3:q:sym", True, 7)])
def test_gptq_lowers_output_error_against_rounding(fmt_spec: str, act_order: bool, block: int) -> None:
    x, w = _correlated_layer()
    fmt = parse_format(fmt_spec)
    cfg = QuantConfig(gptq_act_order=act_order, gptq_block_size=block)
    H = x.T @ x / x.shape[0]
    q_rtn, s_rtn = quantize_rows(w, fmt)
    q_gptq, s_gptq = gptq_quantize(w, H, fmt, cfg)
    assert torch.equal(s_rtn, s_gptq)  # same scales: the grid is the export's, GPTQ only picks integers
    assert q_gptq.dtype == torch.int8 and int(q_gptq.min()) >= fmt.qmin and int(q_gptq.max()) <= fmt.qmax
    y = x @ w.T
    err_rtn = (y - x @ (q_rtn.float() * s_rtn.float()[:, None]).T).square().mean()
    err_gptq = (y - x @ (q_gptq.float() * s_gptq.float()[:, None]).T).square().mean()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_gptq_handles_dead_columns() -> None:
    x, w = _correlated_layer(1)
    x[:, :5] = 0  # inputs that never fire
    q, _ = gptq_quantize(w, x.T @ x, parse_format("int6:max:full"), QuantConfig())
    assert torch.isfinite(q.float()).all()


def _data_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "fineweb_train_000000.bin", rng.integers(0, 1024, 5000))
    write_shard(tmp_path / "fineweb_val_000000.bin", rng.integers(0, 1024, 3000))
    return tmp_path


def test_train_tokens_read_training_shards_only(tmp_path: Path) -> None:
    d = _data_dir(tmp_path)
    src = TrainTokens(DataConfig(path=str(d)), num_seqs=3, seq_len=16, batch_seqs=2)
    batches = list(src.batches(torch.device("cpu")))
    assert [b.shape for b in batches] == [(2, 16), (1, 16)]
    train = np.fromfile(d / "fineweb_train_000000.bin", dtype="<u2", offset=1024)
    assert np.array_equal(torch.cat(batches).reshape(-1).numpy(), train[:48])


def test_validation_shards_can_never_calibrate(tmp_path: Path) -> None:
    d = _data_dir(tmp_path)
    with pytest.raises(DataError, match="validation shard"):  # a train glob that also matches the val shard
        TrainTokens(DataConfig(path=str(d), train_glob="fineweb_*.bin"), num_seqs=1, seq_len=8)
    with pytest.raises(DataError, match="validation"):  # the val shard itself as the "training" glob
        TrainTokens(DataConfig(path=str(d), train_glob="fineweb_val_*.bin", val_glob="nothing_*.bin"), num_seqs=1, seq_len=8)
    shutil.copy(d / "fineweb_val_000000.bin", d / "fineweb_train_000001.bin")  # a renamed copy
    with pytest.raises(DataError, match="same bytes as a validation shard"):
        TrainTokens(DataConfig(path=str(d)), num_seqs=1, seq_len=8)
    (d / "fineweb_val_000000.bin").rename(d / "held_out.bin")  # the copy is now the only trace of it
    (d / "manifest.json").write_text(json.dumps({"val": {"files": [{"name": "fineweb_val_000000.bin", "tokens": 3000,
                                                                    "sha256": hashlib.sha256((d / "held_out.bin").read_bytes()).hexdigest()}]}}))
    with pytest.raises(DataError, match="same bytes as a validation shard"):  # caught through the manifest's hash
        TrainTokens(DataConfig(path=str(d)), num_seqs=1, seq_len=8)


def test_collect_hessians_refuses_raw_tokens() -> None:
    cfg = load_config("pr401", "cpu", [("model.num_layers", 2), ("model.xsa_last_n", 1), ("quant.small_numel", 4096)])
    model = build_model(cfg.model)
    for bad in (torch.randint(0, 1024, (2, 16)), ["fineweb_val_*.bin"], "data/fineweb_val_000000.bin"):
        with pytest.raises(TypeError, match="validation tokens can never"):
            collect_hessians(model, bad, cfg.quant)


def test_collect_hessians_from_self_generated_text() -> None:
    cfg = load_config("pr401", "cpu", [("model.num_layers", 2), ("model.xsa_last_n", 1), ("quant.small_numel", 4096)])
    model = build_model(cfg.model)
    src = SelfGenerated(model, num_seqs=2, seq_len=12, temperature=0.8, seed=3)
    ids = next(iter(src.batches(torch.device("cpu"))))
    assert ids.shape == (2, 12) and (ids[:, 0] == 1).all()
    again = next(iter(SelfGenerated(model, num_seqs=2, seq_len=12, seed=3).batches(torch.device("cpu"))))
    assert torch.equal(ids, again)  # seeded
    hs = collect_hessians(model, src, cfg.quant)
    assert "blocks.0.mlp.fc.weight" in hs and "blocks.1.attn.c_q.weight" in hs and "bigram.proj.weight" in hs
    h = hs["blocks.0.mlp.proj.weight"]
    assert h.shape == (384, 384) and torch.allclose(h, h.T, atol=1e-5)
    assert not any(p.requires_grad is False for p in model.parameters())  # the model is left as it was


@pytest.mark.parametrize("loader", ["shuffled", "coprime", "packed"])
def test_train_tokens_draw_through_the_runs_loader(loader: str, demo_dir) -> None:
    """With a records' loader, calibration batches are that loader's batches (a fresh instance for
    the rank), as R2 (coprime), R4/R5 (shuffled) and R6/R7 (packed) calibrated."""
    from pgolf.data.loaders import build_loader
    from pgolf.data.shards import resolve_shards
    from pgolf.quant.calib import calibration_source

    data = DataConfig(path=str(demo_dir), loader=loader)
    src = TrainTokens(data, num_seqs=5, seq_len=32, batch_seqs=2, rank=1, world_size=2, doc_window=64)
    got = list(src.batches(torch.device("cpu")))
    ref = build_loader(data, resolve_shards(demo_dir, data.train_glob, "training"), 1, 2, torch.device("cpu"), doc_window=64)
    want = [ref.next_batch(b * 32 * 2, 32, 1)[0] for b in (2, 2, 1)]
    assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert sum(b.numel() for b in got) == 5 * 32 and f"{loader} loader, rank 1/2" in src.describe()
    stream = list(TrainTokens(DataConfig(path=str(demo_dir)), num_seqs=5, seq_len=32, batch_seqs=2).batches(torch.device("cpu")))
    assert not torch.equal(torch.cat([b.reshape(-1) for b in got]), torch.cat([b.reshape(-1) for b in stream]))
    # the run config routes its loader and rank through calibration_source
    cfg = load_config("pr1855", "cpu", [("data.path", str(demo_dir)), ("data.loader", loader), ("data.transform", "none"),
                                        ("model.vocab_size", 1024), ("quant.gptq_calib_source", "train")])
    source = calibration_source(cfg, build_model(cfg.model), rank=1, world_size=2)
    assert isinstance(source, TrainTokens) and source.loader_kind == loader and (source.rank, source.world_size) == (1, 2)
