"""quant.hidden_order=greedy: the artifact holds each MLP with its hidden units relabelled into
the greedy L1 order of the fc rows: the same function (logits equal up to float summation order),
the same integers as a multiset, similar rows adjacent, nothing stored for it, and the layers where
relabelling would not be exact left alone."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.config import load_config
from pgolf.errors import ConfigError
from pgolf.model.gpt import build_model
from pgolf.quant.artifact import build_artifact, load_artifact_model, load_artifact_state
from pgolf.quant.config import QuantConfig
from pgolf.quant.container import read_artifact
from pgolf.quant.export import quantize_state_dict
from pgolf.quant.hidden_order import order_mlp_hidden

TINY = [("model.num_layers", 2), ("model.model_dim", 64), ("model.num_heads", 4), ("model.num_kv_heads", 2), ("model.xsa_last_n", 1),
        ("model.bigram_dim", 32), ("model.ve_dim", 32), ("quant.small_numel", 1024), ("train.train_seq_len", 32)]


def _chain_length(rows: torch.Tensor) -> int:
    r = rows.to(torch.int64)
    return int((r[1:] - r[:-1]).abs().sum())


def test_relabelled_mlps_compute_the_same_function(tmp_path: Path) -> None:
    cfg = load_config("pr401", "cpu", TINY + [("quant.codec", "zstd-22")])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    state = model.state_dict()
    plain, greedy = tmp_path / "plain.pgolf", tmp_path / "greedy.pgolf"
    _, q_plain = build_artifact(state, cfg.model, cfg.quant, plain, code_bytes=0)
    cfg.quant.hidden_order = "greedy"
    _, q_greedy = build_artifact(state, cfg.model, cfg.quant, greedy, code_bytes=0)
    assert all(torch.equal(a.values, b.values) for a, b in zip(q_plain, q_greedy))  # returned in the model's own order
    meta, _ = read_artifact(greedy)
    assert meta["hidden_order"] == {"rule": "greedy_l1", "mlps": cfg.model.num_layers}
    _, s_plain = load_artifact_state(plain)
    _, s_greedy = load_artifact_state(greedy)
    for i in range(cfg.model.num_layers):
        fc, proj = f"blocks.{i}.mlp.fc.weight", f"blocks.{i}.mlp.proj.weight"
        assert not torch.equal(s_plain[fc], s_greedy[fc])
        # the same rows (a permutation), the proj columns permuted alike
        order = [int(torch.nonzero((s_plain[fc] == row).all(dim=1))[0]) for row in s_greedy[fc]]
        assert sorted(order) == list(range(s_plain[fc].shape[0]))
        assert torch.equal(s_greedy[proj], s_plain[proj][:, order])
        qf = {q.name: q for q in q_plain}[fc]
        assert _chain_length(qf.values[torch.tensor(order)]) < _chain_length(qf.values)  # neighbours closer
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32))
    m_plain, _ = load_artifact_model(plain)
    m_greedy, _ = load_artifact_model(greedy)
    with torch.no_grad():
        a, b = m_plain.logits(m_plain.forward_hidden(tokens)), m_greedy.logits(m_greedy.forward_hidden(tokens))
    assert a.shape == (2, 32, cfg.model.vocab_size) and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def _qtensors(extra: dict | None = None, **quant) -> list:
    g = torch.Generator().manual_seed(1)
    state = {"blocks.0.mlp.fc.weight": torch.randn(96, 32, generator=g), "blocks.0.mlp.proj.weight": torch.randn(32, 96, generator=g),
             **(extra or {})}
    return quantize_state_dict(state, QuantConfig(mlp_format="int6:sd:sym", small_numel=16, **quant))


def test_layers_that_cannot_be_relabelled_exactly_are_left_alone() -> None:
    qts = _qtensors()
    _, done = order_mlp_hidden(qts)
    assert done == ["blocks.0.mlp."]
    # a gated variant's per-unit weight under the same prefix
    _, done = order_mlp_hidden(_qtensors({"blocks.0.mlp.gate.weight": torch.randn(96, 32)}))
    assert done == []
    # an LQER correction on proj (B's group scales run along the hidden units)
    qts = _qtensors(lqer_top_k=2)
    assert {q.name for q in qts if q.lqer is not None} == {"blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight"}
    stored, done = order_mlp_hidden(qts)
    assert done == [] and all(a is b for a, b in zip(stored, qts))
    # an LQER correction on fc only: A's rows follow the hidden units
    qts = [q if q.name.endswith("fc.weight") else replace(q, lqer=None) for q in _qtensors(lqer_top_k=2)]
    stored, done = order_mlp_hidden(qts)
    fc, fc0 = stored[0], qts[0]
    order = [int(torch.nonzero((fc0.values == row).all(dim=1))[0]) for row in fc.values]
    assert done == ["blocks.0.mlp."] and torch.equal(fc.lqer.qa, fc0.lqer.qa[order]) and torch.equal(fc.scale, fc0.scale[order])
    assert np.allclose(fc.lqer.correction().numpy(), fc0.lqer.correction()[order].numpy())


def test_the_setting_is_validated() -> None:
    with pytest.raises(ConfigError, match="quant.hidden_order"):
        QuantConfig(hidden_order="sorted").validate()
