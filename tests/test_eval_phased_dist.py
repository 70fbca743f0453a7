"""``pgolf eval --ttt phased`` on an artifact file: the eval-only workflow (JSON with the phases,
their timings and per-phase bpb, progress lines on stderr), and the same result from 2 gloo
processes (torch.distributed: batches split over ranks, the scored prefix agreed by all_gather,
global SGD gradients all-reduced) as from 1."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from pgolf.data.shards import write_shard
from pgolf.data.tokenizer import train_tokenizer
from tests.conftest import REPO
from tests.test_eval_helpers import one_thread  # noqa: F401
from tests.test_eval_phased import FRONTIER_TINY, randomised

VOCAB, SEQ = 320, 32


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    from pgolf.config import load_config
    from pgolf.model.gpt import build_model
    from pgolf.quant.artifact import build_artifact

    tmp = tmp_path_factory.mktemp("phasedcli")
    rnd = random.Random(0)
    texts = [" ".join("".join(rnd.choice("abcd") for _ in range(rnd.randint(1, 6))) for _ in range(50)) for _ in range(100)]
    tok = train_tokenizer(texts, tmp / "tok.model", vocab_size=VOCAB)
    cfg = load_config("pr1855", "cpu", FRONTIER_TINY + [("model.vocab_size", VOCAB)])
    torch.manual_seed(0)
    model = randomised(build_model(cfg.model))
    artifact = tmp / "final_model.pgolf"
    build_artifact(model.state_dict(), cfg.model, cfg.quant, artifact, code_bytes=0, meta_extra={"eval_seq_len": SEQ, "train_seq_len": SEQ})
    g = np.random.default_rng(1)
    docs = [np.concatenate(([1], g.integers(4, 68, size=int(g.integers(5, 60))))) for _ in range(17)]
    write_shard(tmp / "fineweb_val_000000.bin", np.concatenate(docs).astype(np.uint16))
    return {"artifact": str(artifact), "val": str(tmp / "fineweb_val_*.bin"), "tokenizer": str(tok)}


ARGS = ["--seq-len", str(SEQ), "--stride", "0", "--json", "--device", "cpu", "--ttt", "phased", "--ttt-lr", "0.01",
        "--ttt-lora-rank", "4"] + [a for kv in ("batch_docs=3", "doc_chunk=8", "prefix_docs=8", "phases=2", "chunk_tokens=64",
                                                "batch_seqs=4", "global_lr=0.02", "warm_start_a=false") for a in ("--ttt-set", kv)]


def _run(files: dict[str, str], nproc: int) -> tuple[dict, str]:
    cmd = ["-m", "pgolf", "eval", "--artifact", files["artifact"], "--val", files["val"], "--tokenizer", files["tokenizer"], *ARGS]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return json.loads(run.stdout[run.stdout.index("{"):]), run.stderr


def test_two_gloo_processes_give_the_single_process_phased_result(files) -> None:
    one, err = _run(files, 1)
    two, _ = _run(files, 2)
    a, b = one["ttt"], two["ttt"]
    assert two["world_size"] == 2 and a["mode"] == "phased"
    # documents, batches, phases, counts: identical
    assert (a["targets"], a["bytes"]) == (b["targets"], b["bytes"]) == (one["standard"]["targets"], one["standard"]["bytes"])
    assert a["documents"] == b["documents"] == 17 and a["batches"] == 6
    assert [p["boundary_docs"] for p in a["phases"]] == [p["boundary_docs"] for p in b["phases"]] == [4, 8]
    assert [(p["tokens"], p["sgd_steps"]) for p in a["phases"]] == [(p["tokens"], p["sgd_steps"]) for p in b["phases"]]
    assert all(p["sgd_steps"] > 0 for p in a["phases"])
    # before the first phase every document is computed the same on any rank (A drawn per batch)
    assert b["segments"][0]["val_bpb"] == pytest.approx(a["segments"][0]["val_bpb"], rel=1e-12)
    # after the phases: the all-reduced SGD gradients differ from the 1-process ones by rounding only
    assert b["val_bpb"] == pytest.approx(a["val_bpb"], rel=1e-6)
    assert a["val_bpb"] != one["standard"]["val_bpb"]
    assert "ttt_phased phase:1 docs:4" in err and "ttt_phased phase:2 docs:8" in err  # progress lines on stderr
    assert one["estimate_8xh100"]["ttt_seconds"] > 0 and "phased TTT" in one["estimate_8xh100"]["assumption"]


def test_audit_causality_checks_phased_ttt_on_an_artifact(files, capsys) -> None:
    from pgolf.cli import main

    code = main(["audit", "causality", "--artifact", files["artifact"], "--val", files["val"], "--tokenizer", files["tokenizer"],
                 "--mode", "ttt", "--ttt", "phased", "--positions", "3", "--seq-len", str(SEQ), "--max-tokens", "200",
                 "--ttt-set", "doc_lora_lr=0.01", "--ttt-set", "global_lr=0.02", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["passed"] is True
    rep = out["modes"][0]
    assert rep["mode"] == "phased" and rep["positions"] == 3 and rep["max_diff_before"] == 0.0
    assert out["ttt"]["mode"] == "phased" and out["ttt"]["phases"] == 2 and out["ttt"]["batch_docs"] >= 1
