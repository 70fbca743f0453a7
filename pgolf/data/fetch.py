"""Download the challenge's published shards and tokenizer from the Hugging Face hub.

The published data set is a dataset repo (default ``willdepueoai/parameter-golf``) whose folder
``<root>/`` (default ``datasets``) holds ``manifest.json``, the shards under
``datasets/fineweb10B_<variant>/`` and the tokenizers under the paths the manifest names. This module
reads that remote manifest, downloads the full validation split, the first N training shards and the
tokenizer files into ONE local folder (shards and tokenizer side by side), checks each shard's header
and size as it arrives, and writes a pgolf ``manifest.json`` for the folder (with the validation
document hashes). Files already present and valid are skipped, so an interrupted fetch resumes.

Variants and where they are hosted (frontier.md 1.1; :data:`VARIANTS`): ``sp1024`` (and the
challenge's other sizes) on willdepueoai/parameter-golf, ``sp4096`` and ``sp8192`` on
kevclark/parameter-golf, ``sp8192-caseops`` (the hub's ``sp8192_lossless_caps_caseops_v1_reserved``)
on romeerp/parameter-golf-caseops-v1, whose validation shards come with byte sidecars
``fineweb_val_bytes_NNNNNN.bin``: they are fetched, checked against their shards, and recorded in
the manifest with the transform. The remote manifest is read fresh on every fetch (downloaded into
a staging folder that is removed afterwards), so a manifest of another repo can never make a
variant "not found" (the official script's stale-manifest trap).

Environment overrides, as in the challenge's own downloader: ``MATCHED_FINEWEB_REPO_ID``,
``MATCHED_FINEWEB_REMOTE_ROOT_PREFIX``; ``HF_ENDPOINT`` selects the hub (a mirror, or a test server).
The order is: the command-line option, then the environment, then the variant's own repo.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pgolf.data.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    doc_hash,
    iter_documents,
    read_manifest,
    shard_record,
    split_record,
    write_manifest,
)
from pgolf.data.shards import read_shard, shard_token_count
from pgolf.data.tokenizer import load_tokenizer, sha256_file
from pgolf.errors import DataError

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"
CASEOPS_DATASET = "sp8192_lossless_caps_caseops_v1_reserved"
#: variant -> (dataset repo, remote root, dataset name after "fineweb10B_"). Other names are
#: looked up as given on the challenge's repo (sp512, sp2048, byte260, ...).
VARIANTS: dict[str, tuple[str, str, str]] = {
    "sp1024": (DEFAULT_REPO_ID, DEFAULT_REMOTE_ROOT, "sp1024"),
    "sp4096": ("kevclark/parameter-golf", DEFAULT_REMOTE_ROOT, "sp4096"),
    "sp8192": ("kevclark/parameter-golf", DEFAULT_REMOTE_ROOT, "sp8192"),
    "sp8192-caseops": ("romeerp/parameter-golf-caseops-v1", "datasets", CASEOPS_DATASET),
    CASEOPS_DATASET: ("romeerp/parameter-golf-caseops-v1", "datasets", CASEOPS_DATASET),
}
DEFAULT_ENDPOINT = "https://huggingface.co"
STAGING = ".download"  # hf_hub_download's local_dir inside out_dir; removed when the fetch ends


def default_out(variant: str) -> Path:
    """``./data/datasets/fineweb10B_<dataset>``: the records' folder name (the long name for CaseOps)."""
    return Path("data/datasets") / f"fineweb10B_{VARIANTS.get(variant, ('', '', variant))[2]}"


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the hub could not be reached" for the installed huggingface_hub.

    Depending on its version huggingface_hub talks through requests (whose errors are OSError and
    land in the generic branch), httpx or httpx2 (errors derive from their own TransportError);
    collect whichever is installed. Only evaluated when a download raised.
    """
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(module).TransportError)
    return tuple(errors)


def _first_line(exc: BaseException) -> str:
    """First line of the innermost cause: "[Errno 111] Connection refused" says more than the wrapper."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Hub:
    """One dataset repo on one endpoint; every download error becomes a one-line DataError."""

    def __init__(self, repo_id: str, endpoint: str, staging: Path):
        self.repo_id, self.endpoint, self.staging = repo_id, endpoint, staging

    def download(self, remote_path: str) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
        )

        try:
            local = hf_hub_download(
                self.repo_id, remote_path, repo_type="dataset", local_dir=self.staging, endpoint=self.endpoint
            )
        except (LocalEntryNotFoundError, OfflineModeIsEnabled, *_network_errors()) as exc:
            raise DataError(
                f"cannot reach the Hugging Face hub at {self.endpoint}: {_first_line(exc)}; "
                "check the network or HF_ENDPOINT"
            ) from None
        except RepositoryNotFoundError:
            raise DataError(
                f"dataset repo {self.repo_id} not found at {self.endpoint}; "
                "check --repo-id (or MATCHED_FINEWEB_REPO_ID)"
            ) from None
        except EntryNotFoundError:
            raise DataError(
                f"{remote_path} not found in dataset repo {self.repo_id}; check --remote-root "
                "(or MATCHED_FINEWEB_REMOTE_ROOT_PREFIX)"
            ) from None
        except HfHubHTTPError as exc:
            raise DataError(f"the hub at {self.endpoint} refused {remote_path}: {_first_line(exc)}") from None
        except OSError as exc:  # disk full, size mismatch after download, ...
            raise DataError(f"download of {remote_path} failed: {_first_line(exc)}; re-run to resume") from None
        return Path(local)


@contextlib.contextmanager
def _hub_progress_bars(enabled: bool) -> Iterator[None]:
    """Show or hide huggingface_hub's per-file byte bars for the duration, restoring the previous state."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    (enable_progress_bars if enabled else disable_progress_bars)()
    try:
        yield
    finally:
        (disable_progress_bars if was_disabled else enable_progress_bars)()


@contextlib.contextmanager
def _removed_afterwards(staging: Path) -> Iterator[None]:
    """Delete the staging folder however the fetch ends: complete files leave it at once, and
    huggingface_hub deletes its partial downloads on failure, so only bookkeeping is lost."""
    try:
        yield
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _select(remote: Any, variant: str, where: str, dataset: str | None = None, hint: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """The remote manifest's dataset entry for ``variant`` (named ``fineweb10B_<dataset>``) and its tokenizer entry."""
    datasets = remote.get("datasets") if isinstance(remote, dict) else None
    if not isinstance(datasets, list):
        raise DataError(f"{where} has no 'datasets' list; check --remote-root")
    names = [d.get("name") for d in datasets if isinstance(d, dict)]
    wanted = f"fineweb10B_{dataset or variant}"
    entry = next((d for d in datasets if isinstance(d, dict) and d.get("name") == wanted), None)
    if entry is None:
        offered = ", ".join(sorted(str(n).removeprefix("fineweb10B_") for n in names)) or "none"
        raise DataError(f"unknown variant {variant!r}: {where} offers {offered}; pass --variant with one of them{hint}")
    tok_name = entry.get("tokenizer_name")
    tokenizers = remote.get("tokenizers") or []
    tok = next((t for t in tokenizers if isinstance(t, dict) and t.get("name") == tok_name), None)
    if tok is None:
        raise DataError(f"{where}: dataset {wanted} names tokenizer {tok_name!r}, which the manifest does not list")
    stats = entry.get("stats")
    counts = [stats.get(k) for k in ("files_train", "files_val")] if isinstance(stats, dict) else []
    if len(counts) != 2 or not all(isinstance(c, int) for c in counts):
        raise DataError(f"{where}: dataset {wanted} has no stats.files_train/files_val counts")
    return entry, tok


def _valid_local(path: Path) -> bool:
    """Whether a file already in out_dir can be kept (shards: header and size check out)."""
    if not path.is_file():
        return False
    if path.suffix == ".bin":
        try:
            shard_token_count(path)
        except DataError:
            return False
        return True
    if path.suffix == ".model":
        try:
            load_tokenizer(path)
        except DataError:
            return False
    return path.stat().st_size > 0


def _tokenizer_facts(path: Path, tok: dict[str, Any], entry: dict[str, Any]) -> tuple[int, int]:
    """(vocab_size, bos_id) of the fetched tokenizer: read from a SentencePiece model, else from the manifest."""
    if path.suffix == ".model":
        sp = load_tokenizer(path)
        return int(sp.vocab_size()), int(sp.bos_id())
    vocab = tok.get("vocab_size", entry.get("vocab_size"))
    bos = tok.get("bos_id", entry.get("bos_id"))
    if not (isinstance(vocab, int) and isinstance(bos, int)):
        raise DataError(f"{path}: not a SentencePiece model and the remote manifest gives no vocab_size/bos_id for it")
    return vocab, bos


def fetch_dataset(
    variant: str = "sp1024",
    train_shards: int = 80,
    out_dir: str | Path | None = None,
    *,
    repo_id: str | None = None,
    remote_root: str | None = None,
    endpoint: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Download ``variant``'s validation split, first ``train_shards`` training shards and tokenizer.

    ``out_dir`` defaults to ``./data/datasets/fineweb10B_<dataset>`` (:func:`default_out`).
    Returns the pgolf manifest written to ``out_dir``.
    """
    home_repo, home_root, dataset = VARIANTS.get(variant, (DEFAULT_REPO_ID, DEFAULT_REMOTE_ROOT, variant))
    repo_id = repo_id or os.environ.get("MATCHED_FINEWEB_REPO_ID") or home_repo
    hint = ""
    if variant in VARIANTS and repo_id != home_repo:
        hint = f" ({variant} is hosted on {home_repo}: pass --repo-id {home_repo} or unset MATCHED_FINEWEB_REPO_ID)"
    if remote_root is None:
        remote_root = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", home_root)
    root = remote_root.strip("/")
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    out = Path(out_dir) if out_dir is not None else default_out(variant)
    if train_shards < 0:
        raise DataError(f"--train-shards must be 0 or more (got {train_shards})")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder; choose another --out")
    previous = _previous_fetch(out, repo_id, root, variant)
    out.mkdir(parents=True, exist_ok=True)
    hub = _Hub(repo_id, endpoint, out / STAGING)
    prefix = f"{root}/" if root else ""

    with _hub_progress_bars(progress), _removed_afterwards(out / STAGING):
        where = f"{repo_id}/{prefix}manifest.json"
        try:
            remote = json.loads(hub.download(f"{prefix}manifest.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{where} is not valid JSON ({exc}); check --remote-root") from None
        entry, tok = _select(remote, variant, where, dataset, hint)
        files_train, files_val = entry["stats"]["files_train"], entry["stats"]["files_val"]
        sidecars = "caseops" in entry["name"]
        if train_shards > files_train:
            raise DataError(
                f"{variant} has {files_train} training shards on {repo_id}, {train_shards} requested; "
                f"pass --train-shards {files_train} or fewer"
            )
        shard_dir = f"{prefix}datasets/{entry['name']}"
        wanted = [f"{shard_dir}/fineweb_val_{i:06d}.bin" for i in range(files_val)]
        if sidecars:
            wanted += [f"{shard_dir}/fineweb_val_bytes_{i:06d}.bin" for i in range(files_val)]
        wanted += [f"{shard_dir}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
        artifacts = [tok[k] for k in ("model_path", "vocab_path", "path") if isinstance(tok.get(k), str)]
        if not artifacts:
            raise DataError(f"{where}: tokenizer {tok.get('name')!r} lists no model_path/vocab_path/path")
        wanted += [f"{prefix}{a}" for a in artifacts]
        names = [Path(w).name for w in wanted]
        if len(set(names)) != len(names):
            raise DataError(f"{where}: two files of {variant} share a name, so they cannot share one folder")

        fetched = 0
        for remote_path in tqdm(wanted, desc=f"fetch {variant}", unit="file", disable=None if progress else True):
            local = out / Path(remote_path).name
            if _valid_local(local):
                continue
            try:
                downloaded = hub.download(remote_path)
            except DataError as exc:
                if "_bytes_" in remote_path and "not found in dataset repo" in str(exc):
                    raise DataError(
                        f"{remote_path}, the byte sidecar of a {variant} validation shard, is missing from {repo_id}; "
                        "CaseOps val_bpb cannot be computed without it: report it to the repo's owner"
                    ) from None
                raise
            if downloaded.suffix == ".bin":
                try:
                    shard_token_count(downloaded)
                except DataError as exc:
                    downloaded.unlink()
                    reason = str(exc).removeprefix(f"{downloaded}: ").split(";")[0]
                    raise DataError(
                        f"downloaded shard {remote_path} is corrupt ({reason}); "
                        "it was removed: re-run the fetch, and report the file if it fails again"
                    ) from None
            os.replace(downloaded, local)
            fetched += 1

    tok_file = out / Path(artifacts[0]).name
    vocab_size, bos_id = _tokenizer_facts(tok_file, tok, entry)
    if sidecars:
        from pgolf.data.caseops import check_operator_pieces
        from pgolf.data.sidecar import read_sidecar

        check_operator_pieces(load_tokenizer(tok_file), str(tok_file))
        for i in range(files_val):
            read_sidecar(out / f"fineweb_val_{i:06d}.bin")  # aligned with its shard, or a one-line error
    # Every published training shard present, also those from an earlier, larger fetch: the loader globs them all.
    train_names = [n for n in (f"fineweb_train_{i:06d}.bin" for i in range(files_train)) if (out / n).is_file()]
    val_names = [f"fineweb_val_{i:06d}.bin" for i in range(files_val)]
    manifest = _build_manifest(out, val_names, train_names, bos_id, previous)
    manifest["tokenizer"] = {"file": tok_file.name, "sha256": sha256_file(tok_file), "vocab_size": vocab_size}
    if sidecars:
        from pgolf.data.manifest import sidecar_record
        from pgolf.data.prepare import caseops_transform_record

        manifest["transform"] = {**caseops_transform_record(), "normalized_before_transform": None}
        for f in manifest["val"]["files"]:
            f["sidecar"] = sidecar_record(out / f["name"])
    manifest["source"] = {
        "kind": "huggingface",
        "endpoint": endpoint,
        "repo_id": repo_id,
        "remote_root": root,
        "variant": variant,
        "dataset": entry,
        "tokenizer": tok,
        "train_shards_requested": train_shards,
        "files_fetched_last_run": fetched,
    }
    write_manifest(out, manifest)
    return manifest


def _previous_fetch(out: Path, repo_id: str, root: str, variant: str) -> dict[str, Any] | None:
    """The manifest of an earlier fetch of the same data into ``out`` (None if there is none).

    A folder whose manifest describes other data (a ``pgolf data prepare`` output, another variant)
    is refused: its shards are valid shards, so the resume logic would keep them as if downloaded.
    """
    if not (out / MANIFEST_NAME).exists():
        return None  # a new folder, or a fetch that stopped before writing its manifest (written last)
    previous = read_manifest(out)
    src = previous["source"]
    origin = (src.get("kind"), src.get("repo_id"), src.get("remote_root"), src.get("variant"))
    if origin != ("huggingface", repo_id, root, variant):
        raise DataError(
            f"{out} already holds other data (made by {previous.get('created_by')!r}, "
            f"source {src.get('repo_id') or src.get('kind')}, variant {src.get('variant')}); fetch into another --out"
        )
    return previous


def _build_manifest(
    out: Path, val_names: list[str], train_names: list[str], bos_id: int, previous: dict[str, Any] | None
) -> dict[str, Any]:
    """Manifest body for the shards in ``out``. Entries of an earlier fetch of the same data are reused
    for shards whose token count is unchanged: re-hashing 80 shards (16 GB) would make a resumed
    fetch slow, and ``pgolf data verify`` re-checks every sha256 on demand."""
    known = {}
    if previous is not None and previous["bos_id"] == bos_id:
        known = {f["name"]: f for split in ("train", "val") for f in previous[split]["files"] if "docs" in f}

    def record(name: str) -> dict[str, Any]:
        old = known.get(name)
        if old is not None and shard_token_count(out / name) == old["tokens"]:
            return old
        return shard_record(out / name, bos_id)

    val_files = [record(n) for n in val_names]
    # The hashes can be reused only if every validation entry was (identity: record() returned the old dict).
    unchanged = previous is not None and len(previous["val"]["files"]) == len(val_files)
    if unchanged and all(f is known.get(f["name"]) for f in val_files):
        hashes = previous["val"]["doc_hashes"]
    else:
        hashes = [doc_hash(d) for d in iter_documents((read_shard(out / n) for n in val_names), bos_id)]
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created_by": "pgolf data fetch",
        "bos_id": bos_id,
        "train": split_record([record(n) for n in train_names]),
        "val": {**split_record(val_files), "doc_hashes": hashes},
    }
