"""Shared pieces of the evaluation tests (no tests here): a tiny GPT with the PR #401 technique
stack, a synthetic byte LUT, hand-made token streams whose prediction needs context, and a short
training loop that makes the model use that context."""

from __future__ import annotations

import pytest
import torch

from pgolf.config import load_config
from pgolf.eval.bpb import ByteLUT
from pgolf.model.gpt import GPT, build_model

VOCAB = 64
SEG = 13  # key token + 12 tokens that depend on it; 13 divides no window length used here

TINY_MODEL = [
    ("model.num_layers", 2),
    ("model.xsa_last_n", 1),
    ("model.model_dim", 64),
    ("model.num_heads", 2),
    ("model.num_kv_heads", 1),
    ("model.vocab_size", VOCAB),
    ("model.bigram_buckets", 64),
    ("model.bigram_dim", 32),
    ("model.ve_dim", 32),
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two spinning OpenMP
    threads run them tens of times slower. Imported by each eval test module (autouse there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(extra: list[tuple[str, object]] | None = None):
    """pr401 at the cpu profile, shrunk: BigramHash, SmearGate, VE, XSA, partial RoPE all on."""
    return load_config("pr401", "cpu", TINY_MODEL + list(extra or []))


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return build_model(tiny_cfg().model).eval()


def synthetic_lut(vocab: int = VOCAB, seed: int = 0) -> ByteLUT:
    """1-3 bytes per token, ~30% with a leading space, token 0 a boundary (control) token."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(1, 4, (vocab,), generator=g).to(torch.int16)
    base[0] = 0
    space = torch.rand(vocab, generator=g) < 0.3
    space[0] = False
    return ByteLUT(base, space, torch.arange(vocab) == 0)


def segment_stream(n: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    """``n`` tokens of segments: a key k in [1, 16) then 12 tokens that are a fixed function of
    (k, position). The first token of a segment is unpredictable, the rest need the key, which a
    window that starts mid-segment does not see: longer context gives lower loss."""
    table = torch.randint(16, vocab, (16, SEG - 1), generator=torch.Generator().manual_seed(123))
    keys = torch.randint(1, 16, (n // SEG + 1,), generator=torch.Generator().manual_seed(seed))
    segs = torch.cat((keys[:, None], table[keys]), dim=1)
    return segs.reshape(-1)[:n].to(torch.int64)


def train_tiny(model: GPT, steps: int = 80, seq_len: int = 32, batch: int = 16, lr: float = 5e-3, seed: int = 5) -> GPT:
    """A few Adam steps on a (training) segment stream; returns the model in eval mode."""
    data = segment_stream(50_000, seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=g)
        idx = starts[:, None] + torch.arange(seq_len + 1)
        win = data[idx]
        loss = model(win[:, :-1], win[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()
