"""Shared fixtures: a real (demo) data folder built once per session, and a tiny run config."""

from __future__ import annotations

import os
from pathlib import Path

# The test models are tiny: one thread per process is faster than two (less synchronisation), and
# tests that start torchrun workers would otherwise oversubscribe the 2 cores. Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A tiny model and loop: seconds per run on 2 CPU cores, every code path of a real run.
TINY_RUN = [
    ("model.num_layers", 2),
    ("model.model_dim", 64),
    ("model.num_heads", 4),
    ("model.num_kv_heads", 2),
    ("train.train_seq_len", 64),
    ("train.train_batch_tokens", 512),
    ("train.grad_accum_base", 1),
    ("train.iterations", 6),
    ("train.max_wallclock_seconds", 0.0),
    ("train.warmdown_iters", 3),
    ("train.train_log_every", 1),
    ("train.val_loss_every", 0),
    ("train.progress", False),
    ("train.autocast", "off"),
    ("eval.max_val_tokens", 4096),
    ("eval.val_batch_tokens", 2048),
]


def tiny_set_args(extra: list[tuple[str, object]] | None = None) -> list[str]:
    """TINY_RUN (+ extra) as ``--set k=v`` CLI arguments."""
    out = []
    for k, v in TINY_RUN + list(extra or []):
        out += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    return out


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from pgolf.data.demo import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("pgolf-cache"), progress=False)


@pytest.fixture(scope="session")
def shared_tokenizer() -> Path:
    path = SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model"
    if not path.is_file():
        pytest.skip(f"the official tokenizer is not available at {path} (../shared/data is absent)")
    return path
