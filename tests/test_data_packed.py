"""DocumentPackingLoader + document-masked attention (R6/R7, frontier.md 3.11): the loss of a packed
batch equals the mean of the losses of its documents run one at a time with ordinary attention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgolf.data.config import DataConfig
from pgolf.data.loaders import build_loader
from pgolf.data.shards import write_shard
from pgolf.errors import ConfigError
from pgolf.model.attention import DocumentAttention, _sdpa, document_attention_pieces, document_attention_reference, document_piece_starts
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT

W = 16  # document pieces (the records' 2048)
VOCAB = 64


def _doc_shards(folder: Path, lengths: list[list[int]], seed: int = 0) -> list[Path]:
    """Shards of documents BOS(1) + tokens with the given lengths (tokens in 2..VOCAB-1)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i, docs in enumerate(lengths):
        parts = [np.concatenate(([1], rng.integers(2, VOCAB, size=n))) for n in docs]
        path = folder / f"fineweb_train_{i:06d}.bin"
        write_shard(path, np.concatenate(parts).astype(np.uint16))
        paths.append(path)
    return paths


def _cfg(window: int, **extra) -> ModelConfig:
    base = dict(vocab_size=VOCAB, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
                mlp_activation="leaky_relu2", xsa_last_n=3, skip_gates=True, parallel_residual="two_lane",
                parallel_start=1, attn_out_gate="sparse", gate_window=4, rope_dims=4, qk_gain_init=5.0,
                doc_attention_window=window, attention_backend="sdpa")
    base.update(extra)
    return ModelConfig(**base)


def _models(**extra) -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    masked = GPT(_cfg(W, **extra)).double()
    for p in masked.parameters():  # zero-init projections would hide attention: randomise everything
        torch.nn.init.normal_(p, std=0.2)
    plain = GPT(_cfg(0, **extra)).double()
    plain.load_state_dict(masked.state_dict())
    return masked, plain


def _segments(x: list[int]) -> list[tuple[int, int]]:
    """Independent reference of the records' cu_seqlens: starts at 0 and at every BOS, cut every W."""
    starts = sorted({0} | {i for i, t in enumerate(x) if t == 1})
    out = []
    for a, b in zip(starts, starts[1:] + [len(x)]):
        out += [(s, min(s + W, b)) for s in range(a, b, W)]
    return out


@pytest.mark.parametrize("extra", [{}, {"smear_gate_v2": True}])
def test_packed_loss_equals_mean_of_documents_run_one_at_a_time(tmp_path: Path, extra: dict) -> None:
    long_docs = not extra  # SmearGate v2 mixes a piece's first token with the previous piece: docs <= W then
    lengths = [[5, 40, 3, 7, 20, 1, 12, 33, 9, 15]] if long_docs else [[5, 14, 3, 7, 15, 1, 12, 8, 9, 15, 10, 6]]
    files = _doc_shards(tmp_path, lengths)
    loader = build_loader(DataConfig(loader="packed"), files, 0, 1, torch.device("cpu"), doc_window=W)
    x, y = loader.next_batch(96, 32, 1)
    assert x.shape == y.shape == (1, 96) and torch.equal(x[0, 1:], y[0, :-1])
    masked, plain = _models(**extra)
    with torch.no_grad():
        packed = masked(x, y).item()
        segs = _segments(x[0].tolist())
        assert any(a > 0 and x[0, a] != 1 for a, _ in segs) == long_docs  # long documents really are cut
        total = sum(plain.token_nll(x[:, a:b], y[:, a:b]).sum().item() for a, b in segs)
        assert packed == pytest.approx(total / x.numel(), rel=1e-10, abs=0)
        crossing = plain(x, y).item()  # ordinary causal attention over the packed row sees other documents
    assert abs(crossing - packed) > 1e-4


def test_blocked_pieces_and_dense_attention_agree_and_the_varlen_glue_builds_cu_seqlens() -> None:
    torch.manual_seed(1)
    ids = torch.randint(0, 5, (2, 45))
    ids[1, :30] = 3  # one document longer than two windows
    ps = document_piece_starts(ids, 1, 8)
    q = torch.randn(2, 45, 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, 45, 2, 8, dtype=torch.float64), torch.randn(2, 45, 2, 8, dtype=torch.float64)
    pos = torch.arange(45)
    dense = _sdpa(q, k, v, (pos[None, None] <= pos[None, :, None]) & (pos[None, None] >= ps[:, :, None]))
    torch.testing.assert_close(document_attention_reference(q, k, v, ps, 8), dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(document_attention_pieces(q, k, v, ps), dense, rtol=0, atol=1e-12)
    assert ps[1, :30].tolist() == [0] * 8 + [8] * 8 + [16] * 8 + [24] * 6

    calls = []

    def fake_varlen(qf, kf, vf, cu_q, cu_k, mq, mk, causal):
        """FlashAttention's varlen contract, computed segment by segment."""
        assert causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and mq == mk == 8
        cu = cu_q.tolist()
        assert cu == sorted(cu) and cu[0] == 0 and cu[-1] == qf.size(0)
        calls.append([b - a for a, b in zip(cu[:-1], cu[1:]) if b > a])
        out = torch.zeros_like(qf)
        for a, b in zip(cu[:-1], cu[1:]):
            if b > a:
                out[a:b] = F.scaled_dot_product_attention(qf[None, a:b].transpose(1, 2), kf[None, a:b].transpose(1, 2),
                                                          vf[None, a:b].transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)[0]
        return out

    kern = DocumentAttention(1, 8, "sdpa")
    kern.varlen = fake_varlen
    torch.testing.assert_close(kern._flash_varlen(q, k, v, ps), dense, rtol=0, atol=1e-12)
    assert max(calls[0]) <= 8 and sum(calls[0]) == 90


def test_packed_loader_spans_ranks_skips_shard_tails_and_resumes(tmp_path: Path) -> None:
    files = _doc_shards(tmp_path, [[3, 30, 20, 10], [25, 25, 25], [8] * 12], seed=3)
    shard0 = np.fromfile(files[0], dtype="<u2", offset=1024)
    cfg = DataConfig(loader="packed")
    r0 = build_loader(cfg, files, 0, 2, torch.device("cpu"), doc_window=W)
    r1 = build_loader(cfg, files, 1, 2, torch.device("cpu"), doc_window=W)
    (x0, y0), (x1, _) = r0.next_batch(40, 10, 1), r1.next_batch(40, 10, 1)
    span = shard0[:42]  # (20 + 1) * 2 tokens from the first BOS (position 0)
    assert x0[0].tolist() == span[:20].tolist() and y0[0].tolist() == span[1:21].tolist()
    assert x1[0].tolist() == span[21:41].tolist()  # rank 1: the next 21 tokens, disjoint from rank 0's
    # Shard 0 (67 tokens) has 25 left after one call: less than a 42-token span, so the tail is skipped.
    x, _ = r0.next_batch(40, 10, 1)
    shard1 = np.fromfile(files[1], dtype="<u2", offset=1024)
    assert x[0].tolist() == shard1[:20].tolist()
    state = r0.state_dict()
    want = [r0.next_batch(40, 10, 1)[0] for _ in range(4)]  # wraps around to shard 0 again
    again = build_loader(cfg, files, 0, 2, torch.device("cpu"), doc_window=W)
    again.load_state_dict(state)
    assert all(torch.equal(a, again.next_batch(40, 10, 1)[0]) for a in want)
    with pytest.raises(ConfigError, match="set model.doc_attention_window"):
        build_loader(cfg, files, 0, 1, torch.device("cpu"), doc_window=0)
    with pytest.raises(ConfigError, match="set model.rope_scaling=none"):
        build_loader(cfg, files, 0, 1, torch.device("cpu"), doc_window=W, rope_scaling="ntk")
