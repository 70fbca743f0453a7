"""The data folder's ``manifest.json``: what is in the folder, and checks that it is still true.

A data folder holds ``fineweb_val_*.bin`` and ``fineweb_train_*.bin`` shards, the tokenizer they were
made with, and ``manifest.json``::

    {"format": "pgolf-data-manifest", "version": 1, "created_by": "pgolf data prepare",
     "tokenizer": {"file": "fineweb_1024_bpe.model", "sha256": "...", "vocab_size": 1024},
     "bos_id": 1,
     "train": {"files": [{"name": "fineweb_train_000000.bin", "tokens": N, "sha256": "...", "docs": D}],
               "tokens": N, "docs": D},
     "val": {"files": [...], "tokens": N, "docs": D, "doc_hashes": ["0123456789abcdef", ...]},
     "source": {...}}

CaseOps data (``pgolf data prepare --caseops``, the ``sp8192-caseops`` fetch) add
``"transform": {"name": "lossless_caps_caseops_v1", "byte_sidecar": true, ...}`` and, on every
validation file, ``"sidecar": {"name": "fineweb_val_bytes_000000.bin", "sha256": ..., "bytes": B}``
(see ``pgolf.data.sidecar``), so nothing downstream has to guess how bytes are counted.

``doc_hashes`` fingerprint every validation document so that :func:`check_disjoint` can prove that
no training document is also a validation document (the leak of field-notes §1.2 was only found
through a log line; this makes it checkable). A document hash is blake2b (8-byte digest, hex) of the
document's token ids as little-endian uint16 bytes, without its BOS; documents are split at BOS in
the concatenated token stream, so a document that spans two shards is hashed whole.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pgolf.data.shards import read_shard, resolve_shards, shard_token_count
from pgolf.data.tokenizer import atomic_write_bytes, sha256_file
from pgolf.errors import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "pgolf-data-manifest"
MANIFEST_VERSION = 1
SHARD_GLOBS = ("fineweb_train_*.bin", "fineweb_val_*.bin")


def doc_hash(doc: np.ndarray) -> str:
    """Hash of one document's token ids (BOS excluded): blake2b, 8-byte digest, hex."""
    return hashlib.blake2b(np.ascontiguousarray(doc, dtype="<u2").tobytes(), digest_size=8).hexdigest()


#: Hash of a document with no tokens. Empty documents carry no text, so they are never a leak.
EMPTY_DOC_HASH = doc_hash(np.zeros(0, dtype=np.uint16))


def iter_documents(arrays: Iterable[np.ndarray], bos_id: int = 1) -> Iterator[np.ndarray]:
    """Split a token stream, given as consecutive arrays (shards), into documents without their BOS.

    A document continues across array boundaries. Tokens before the first BOS, if any, form a
    document of their own (a stream cut mid-document), so no token is ever skipped.
    """
    open_doc: list[np.ndarray] | None = None  # pieces of the document not yet closed by a BOS
    for tokens in arrays:
        starts = np.flatnonzero(tokens == bos_id)
        head_end = int(starts[0]) if starts.size else tokens.size
        if head_end > 0:
            if open_doc is None:
                open_doc = []
            open_doc.append(tokens[:head_end])
        if not starts.size:
            continue
        if open_doc is not None:
            yield np.concatenate(open_doc) if len(open_doc) > 1 else open_doc[0]
        for a, b in zip(starts[:-1], starts[1:]):
            yield tokens[a + 1 : b]
        open_doc = [tokens[int(starts[-1]) + 1 :]]
    if open_doc is not None:
        yield np.concatenate(open_doc) if len(open_doc) > 1 else open_doc[0]


def document_hashes(tokens: np.ndarray, bos_id: int = 1) -> list[str]:
    """Hashes of the documents in one token array, in order (see the module docstring)."""
    return [doc_hash(doc) for doc in iter_documents([np.asarray(tokens)], bos_id)]


def shard_record(path: Path, bos_id: int) -> dict[str, Any]:
    """The manifest entry of one shard: name, token count, sha256 and number of BOS (documents starting in it)."""
    tokens = read_shard(path)
    return {
        "name": path.name,
        "tokens": int(tokens.size),
        "sha256": sha256_file(path),
        "docs": int(np.count_nonzero(tokens == bos_id)),
    }


def split_record(files: list[dict[str, Any]]) -> dict[str, Any]:
    """A split's entry from its file entries (totals summed)."""
    return {
        "files": files,
        "tokens": sum(int(f["tokens"]) for f in files),
        "docs": sum(int(f.get("docs", 0)) for f in files),
    }


def _fail(where: Path, what: str) -> DataError:
    return DataError(f"{where}: {what}; re-create it with `pgolf data prepare` or `pgolf data fetch`")


def _check_schema(m: Any, where: Path) -> None:
    """Raise DataError naming ``where`` unless ``m`` follows the manifest schema."""
    if not isinstance(m, dict):
        raise _fail(where, "not a JSON object")
    if m.get("format") != MANIFEST_FORMAT:
        raise _fail(where, f"not a pgolf data manifest (format {m.get('format')!r}, expected {MANIFEST_FORMAT!r})")
    if m.get("version") != MANIFEST_VERSION:
        raise _fail(where, f"unsupported manifest version {m.get('version')!r} (this pgolf reads {MANIFEST_VERSION})")
    tok = m.get("tokenizer")
    if not (isinstance(tok, dict) and isinstance(tok.get("file"), str) and isinstance(tok.get("sha256"), str)
            and isinstance(tok.get("vocab_size"), int)):
        raise _fail(where, "'tokenizer' must have file, sha256 and vocab_size")
    if not isinstance(m.get("bos_id"), int):
        raise _fail(where, "'bos_id' must be an integer")
    for split in ("train", "val"):
        s = m.get(split)
        if not (isinstance(s, dict) and isinstance(s.get("files"), list) and isinstance(s.get("tokens"), int)
                and isinstance(s.get("docs"), int)):
            raise _fail(where, f"'{split}' must have files, tokens and docs")
        for f in s["files"]:
            if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("tokens"), int)
                    and isinstance(f.get("sha256"), str)):
                raise _fail(where, f"every '{split}' file needs name, tokens and sha256")
    names = [tok["file"]] + [f["name"] for split in ("train", "val") for f in m[split]["files"]]
    for name in names:
        if not name or name != Path(name).name or name in (".", ".."):
            raise _fail(where, f"file name {name!r} must be a plain name inside the folder")
    hashes = m["val"].get("doc_hashes")
    if not (isinstance(hashes, list) and all(isinstance(h, str) for h in hashes)):
        raise _fail(where, "'val.doc_hashes' must be a list of strings")
    if len(hashes) != m["val"]["docs"]:
        raise _fail(where, f"val lists {m['val']['docs']} docs but {len(hashes)} doc_hashes")
    if not isinstance(m.get("source"), dict):
        raise _fail(where, "'source' must be an object")
    transform = m.get("transform")
    if transform is not None and not (isinstance(transform, dict) and isinstance(transform.get("name"), str)):
        raise _fail(where, "'transform' must be null or an object with a name")
    for f in m["val"]["files"]:
        side = f.get("sidecar")
        if side is not None and not (isinstance(side, dict) and isinstance(side.get("name"), str)
                                     and isinstance(side.get("sha256"), str) and isinstance(side.get("bytes"), int)):
            raise _fail(where, f"val file {f['name']}: 'sidecar' must have name, sha256 and bytes")
        if side is not None and (side["name"] != Path(side["name"]).name or "_bytes_" not in side["name"]):
            raise _fail(where, f"val file {f['name']}: sidecar name {side['name']!r} must be a plain *_bytes_* name")
    if transform is not None and transform.get("byte_sidecar") and not all(f.get("sidecar") for f in m["val"]["files"]):
        raise _fail(where, f"transform {transform['name']!r} charges bytes through a sidecar, but a val file lists none")


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Check ``manifest`` against the schema and write ``folder/manifest.json`` atomically."""
    path = Path(folder) / MANIFEST_NAME
    _check_schema(manifest, path)
    atomic_write_bytes(path, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    return path


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and check ``folder/manifest.json``; DataError naming the file if it is missing or invalid."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: {folder} is not a prepared data folder; "
            "make one with `pgolf data prepare`, `pgolf data fetch` or `pgolf data demo`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"unreadable JSON ({exc})") from None
    _check_schema(manifest, path)
    return manifest


def tokenizer_path_for(folder: str | Path) -> Path:
    """The tokenizer file named by the folder's manifest; DataError if the manifest or the file is absent."""
    manifest = read_manifest(folder)
    path = Path(folder) / manifest["tokenizer"]["file"]
    if not path.is_file():
        raise DataError(
            f"{Path(folder) / MANIFEST_NAME} names tokenizer {manifest['tokenizer']['file']} but {path} "
            "does not exist; "
            "re-run `pgolf data prepare`/`pgolf data fetch`, or set data.tokenizer to the .model file"
        )
    return path


def check_disjoint(
    folder: str | Path, train_glob: str = "fineweb_train_*.bin", *, progress: bool = False
) -> dict[str, Any]:
    """Re-hash every training document and report those whose hash is a validation document's hash.

    Returns ``{"train_files", "train_docs", "val_docs", "overlapping_docs", "overlap_hashes"}``;
    ``overlapping_docs`` counts training documents (with repeats), ``overlap_hashes`` lists the
    distinct offending hashes. Empty documents are never reported.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    val_names = {f["name"] for f in manifest["val"]["files"]}
    files = resolve_shards(folder, train_glob, "training")
    clash = [f for f in files if f.name in val_names or fnmatch.fnmatch(f.name, "fineweb_val_*")]
    if clash:
        raise DataError(f"{clash[0]}: train glob {train_glob!r} matches a validation shard; use fineweb_train_*.bin")
    val_hashes = set(manifest["val"]["doc_hashes"]) - {EMPTY_DOC_HASH}
    shards = (read_shard(f) for f in tqdm(files, desc="hash train docs", unit="shard", disable=None if progress else True))
    train_docs = overlapping = 0
    offending: set[str] = set()
    for doc in iter_documents(shards, manifest["bos_id"]):
        train_docs += 1
        h = doc_hash(doc)
        if h in val_hashes:
            overlapping += 1
            offending.add(h)
    return {
        "train_files": len(files),
        "train_docs": train_docs,
        "val_docs": len(manifest["val"]["doc_hashes"]),
        "overlapping_docs": overlapping,
        "overlap_hashes": sorted(offending),
    }


def verify_files(folder: str | Path, *, progress: bool = False) -> list[dict[str, str]]:
    """Check every file the manifest lists (existence, shard header, token count, sha256).

    Returns one row per file, ``{"split", "name", "status"}`` with status ``"ok"`` or what is wrong.
    Shards that match the train/val globs but are not listed are reported too: the loaders pick files
    by glob, so an unlisted shard would silently join training or validation.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    rows: list[dict[str, str]] = []
    tok = manifest["tokenizer"]
    tok_path = folder / tok["file"]
    if not tok_path.is_file():
        status = "missing"
    else:
        status = "ok" if sha256_file(tok_path) == tok["sha256"] else "sha256 differs from the manifest"
    rows.append({"split": "tokenizer", "name": tok["file"], "status": status})
    listed = {tok["file"]}
    entries = [(split, f) for split in ("val", "train") for f in manifest[split]["files"]]
    for split, entry in tqdm(entries, desc="verify", unit="file", disable=None if progress else True):
        listed.add(entry["name"])
        rows.append({"split": split, "name": entry["name"], "status": _check_shard(folder / entry["name"], entry)})
    for entry in manifest["val"]["files"]:
        side = entry.get("sidecar")
        if side is not None:
            listed.add(side["name"])
            rows.append({"split": "val-bytes", "name": side["name"], "status": _check_sidecar(folder, entry, side)})
    for split in ("train", "val"):
        total = sum(f["tokens"] for f in manifest[split]["files"])
        if total != manifest[split]["tokens"]:
            status = f"files sum to {total} tokens, manifest says {manifest[split]['tokens']}"
            rows.append({"split": split, "name": "(total)", "status": status})
    for pattern in SHARD_GLOBS:
        for path in sorted(folder.glob(pattern)):
            if path.name not in listed:
                rows.append({"split": "?", "name": path.name, "status": "shard not listed in the manifest"})
    return rows


def _check_sidecar(folder: Path, entry: dict[str, Any], side: dict[str, Any]) -> str:
    from pgolf.data.sidecar import read_sidecar, sidecar_path

    path = folder / side["name"]
    if not path.is_file():
        return "missing"
    if sidecar_path(folder / entry["name"]).name != side["name"]:
        return f"not the sidecar name of {entry['name']}"
    try:
        counts = read_sidecar(folder / entry["name"])
    except DataError as exc:
        return str(exc).split(";")[0]
    if int(counts.sum(dtype=np.int64)) != side["bytes"]:
        return f"{int(counts.sum(dtype=np.int64))} bytes, manifest says {side['bytes']}"
    if sha256_file(path) != side["sha256"]:
        return "sha256 differs from the manifest"
    return "ok"


def sidecar_record(shard: Path) -> dict[str, Any]:
    """The manifest entry of a validation shard's byte sidecar: name, sha256 and total bytes."""
    from pgolf.data.sidecar import read_sidecar, sidecar_path

    counts = read_sidecar(shard)
    path = sidecar_path(shard)
    return {"name": path.name, "sha256": sha256_file(path), "bytes": int(counts.sum(dtype=np.int64))}


def _check_shard(path: Path, entry: dict[str, Any]) -> str:
    if not path.is_file():
        return "missing"
    try:
        count = shard_token_count(path)
    except DataError as exc:
        return str(exc).removeprefix(f"{path}: ").split(";")[0]
    if count != entry["tokens"]:
        return f"{count} tokens, manifest says {entry['tokens']}"
    if sha256_file(path) != entry["sha256"]:
        return "sha256 differs from the manifest"
    return "ok"


def remove_stale_outputs(folder: Path) -> None:
    """Delete the shards and manifest of an earlier run (used when overwriting a data folder)."""
    for pattern in (*SHARD_GLOBS, MANIFEST_NAME):
        for path in folder.glob(pattern):
            os.remove(path)
