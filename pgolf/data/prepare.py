"""Build a challenge-format data folder from a JSONL file of documents.

The first ``val_docs`` documents become the validation split and all the others training, exactly
like the challenge's own export (its validation set is the first 50,000 documents of its list).
Nothing else decides the split, so the two are disjoint by construction; the manifest records a
hash of every validation document so that :func:`pgolf.data.manifest.check_disjoint` can prove it
later. Each document is stored as [BOS] + ids with no EOS; shards are filled to exactly
``shard_tokens`` tokens (a document may continue in the next shard), and the validation split
always ends its last shard before training begins.

``caseops=True`` runs the CaseOps pipeline (frontier.md 1.4): each document is normalised the way
the tokenizer normalises (nmt_nfkc, whitespace runs collapsed), transformed by
``pgolf.data.caseops.encode`` and encoded as [BOS] + ids; a trained tokenizer gets the four
operators as user-defined symbols (ids 4-7, as the record's), and every validation shard gets its
byte sidecar ``fineweb_val_bytes_NNNNNN.bin`` (0 for BOS and operators, the original UTF-8 bytes
of every other token). Each validation document's sidecar bytes are checked to equal the UTF-8
length of its normalised text. The manifest records the transform.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from pgolf.data.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    SHARD_GLOBS,
    doc_hash,
    remove_stale_outputs,
    shard_record,
    sidecar_record,
    split_record,
    write_manifest,
)
from pgolf.data.shards import write_shard
from pgolf.data.sidecar import write_sidecar
from pgolf.data.tokenizer import challenge_normalizer, check_vocab_size, load_tokenizer, sha256_file, tokenizer_normalizer
from pgolf.data.tokenizer import train_tokenizer as train_sp_tokenizer
from pgolf.errors import DataError

ENCODE_BATCH = 512  # documents per sp.encode call: amortises the call and lets SentencePiece use threads


def iter_jsonl_texts(path: Path, text_key: str = "text") -> Iterator[str]:
    """The ``text_key`` field of every JSON line; DataError naming the file and line on bad input.

    Lines are read as bytes and split at b"\n" only, so the reported line number is exact (text mode
    would decode ahead in blocks and also split at a bare "\r"). Whitespace-only lines are not
    documents and are skipped (a trailing blank line is common).
    """
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot open the documents file ({exc.strerror})") from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise DataError(f"{path}:{line_no}: not valid UTF-8") from None
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{line_no}: malformed JSON ({exc.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(record, dict) or text_key not in record:
                raise DataError(f"{path}:{line_no}: no {text_key!r} field; each line needs one (or pass --text-key)")
            text = record[text_key]
            if not isinstance(text, str):
                raise DataError(f"{path}:{line_no}: {text_key!r} is {type(text).__name__}, expected a string")
            yield text


class _ShardWriter:
    """Appends documents to one split's stream and writes a shard each time ``shard_tokens`` are
    full; with ``sidecar`` each document comes with its per-token byte counts, written alongside."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, bos_id: int, sidecar: bool = False):
        self.folder, self.split, self.shard_tokens, self.bos_id = folder, split, shard_tokens, bos_id
        self.sidecar = sidecar
        self.parts: list[np.ndarray] = []
        self.side_parts: list[np.ndarray] = []
        self.fill = 0
        self.records: list[dict[str, Any]] = []

    def add(self, doc: np.ndarray, side: np.ndarray | None = None) -> None:
        assert (side is not None) == self.sidecar and (side is None or side.size == doc.size)
        while doc.size:
            take = min(self.shard_tokens - self.fill, doc.size)
            self.parts.append(doc[:take])
            if side is not None:
                self.side_parts.append(side[:take])
                side = side[take:]
            self.fill += take
            doc = doc[take:]
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self.fill:
            return
        path = self.folder / f"fineweb_{self.split}_{len(self.records):06d}.bin"
        write_shard(path, np.concatenate(self.parts))
        record = shard_record(path, self.bos_id)
        if self.sidecar:
            write_sidecar(path, np.concatenate(self.side_parts))
            record["sidecar"] = sidecar_record(path)
        self.records.append(record)
        self.parts, self.side_parts, self.fill = [], [], 0


def _check_shardable(sp: spm.SentencePieceProcessor, path: Path) -> None:
    """Documents are stored as [BOS] + ids in uint16: the tokenizer needs a BOS and at most 65536 pieces."""
    if sp.bos_id() < 0 or sp.vocab_size() > 65536:
        raise DataError(f"tokenizer {path} cannot make shards: it needs a BOS piece and at most 65536 pieces")


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    existing = [p for pattern in (*SHARD_GLOBS, MANIFEST_NAME) for p in out_dir.glob(pattern)]
    if existing and not overwrite:
        raise DataError(
            f"{out_dir} already holds prepared data ({existing[0].name}); pass --overwrite to replace it, "
            "or choose another --out folder"
        )
    if existing:
        remove_stale_outputs(out_dir)


def prepare_dataset(
    docs_jsonl: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    train_tokenizer: bool = False,
    vocab_size: int = 1024,
    val_docs: int,
    shard_tokens: int = 100_000_000,
    text_key: str = "text",
    progress: bool = True,
    overwrite: bool = False,
    caseops: bool = False,
) -> dict[str, Any]:
    """Tokenize ``docs_jsonl`` into shards + tokenizer + manifest.json in ``out_dir``; return the manifest.

    Give either ``tokenizer`` (a SentencePiece .model, copied into the folder) or
    ``train_tokenizer=True`` (a ``vocab_size``-piece BPE trained with the challenge's settings on
    the training documents only: validation text must not shape the tokenizer). ``vocab_size`` is
    used only when training. ``caseops`` runs the CaseOps pipeline (module docstring).
    """
    from pgolf.data import caseops as cops

    docs_jsonl, out_dir = Path(docs_jsonl), Path(out_dir)
    if (tokenizer is None) == (not train_tokenizer):
        raise DataError("give exactly one of --tokenizer MODEL or --train-tokenizer")
    if val_docs < 1:
        raise DataError(f"--val-docs must be at least 1 (got {val_docs}): every data folder needs a validation split")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be positive (got {shard_tokens})")
    if not docs_jsonl.is_file():
        raise DataError(
            f"documents file {docs_jsonl} does not exist; pass a JSONL file with one {{\"{text_key}\": ...}} per line"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a folder; choose another --out")
    # Check the tokenizer (or the size of the one to train) before writing anything.
    if tokenizer is not None:
        if not Path(tokenizer).is_file():  # named as the option the user typed, not as data.tokenizer
            raise DataError(f"--tokenizer {tokenizer}: no such file; pass an existing SentencePiece .model, "
                            "or --train-tokenizer to train one on the documents")
        sp = load_tokenizer(tokenizer)
        _check_shardable(sp, Path(tokenizer))
        if caseops:
            cops.check_operator_pieces(sp, str(tokenizer))
    else:
        check_vocab_size(vocab_size)

    total_docs = sum(1 for _ in iter_jsonl_texts(docs_jsonl, text_key))  # also validates every line
    if total_docs <= val_docs:
        raise DataError(
            f"{docs_jsonl} has {total_docs} documents, so --val-docs {val_docs} leaves none for training; "
            "lower --val-docs or add documents"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_out_dir(out_dir, overwrite)

    if train_tokenizer:
        suffix = f"_{cops.TRANSFORM_NAME}" if caseops else ""
        tok_path = out_dir / f"pgolf_{vocab_size}_bpe{suffix}.model"
        training_texts = (t for i, t in enumerate(iter_jsonl_texts(docs_jsonl, text_key)) if i >= val_docs)
        if caseops:
            norm = challenge_normalizer()
            training_texts = (cops.encode(norm(t)) for t in training_texts)
        if progress:  # stderr, like the progress bar: stdout is for results (`pgolf data demo` prints a path)
            print(f"training a {vocab_size}-piece BPE tokenizer on the {total_docs - val_docs} training documents"
                  + (" (CaseOps)" if caseops else ""), file=sys.stderr, flush=True)
        train_sp_tokenizer(training_texts, tok_path, vocab_size,
                           user_defined_symbols=list(cops.OPERATORS) if caseops else None)
        sp = load_tokenizer(tok_path, vocab_size)
        _check_shardable(sp, tok_path)
        if caseops:
            cops.check_operator_pieces(sp, str(tok_path))
    else:
        assert tokenizer is not None
        tok_path = out_dir / Path(tokenizer).name
        if Path(tokenizer).resolve() != tok_path.resolve():
            tmp = tok_path.with_name(f".{tok_path.name}.tmp")
            shutil.copyfile(tokenizer, tmp)
            os.replace(tmp, tok_path)
    bos_id = int(sp.bos_id())

    writers = {"val": _ShardWriter(out_dir, "val", shard_tokens, bos_id, sidecar=caseops),
               "train": _ShardWriter(out_dir, "train", shard_tokens, bos_id)}
    val_hashes: list[str] = []
    texts = iter_jsonl_texts(docs_jsonl, text_key)
    normalize = tokenizer_normalizer(sp)
    table = cops.piece_byte_table(sp) if caseops else None
    index = 0
    with tqdm(total=total_docs, desc="tokenize", unit="doc", disable=None if progress else True) as bar:
        while batch := [t for _, t in zip(range(ENCODE_BATCH), texts)]:
            if caseops:
                batch = [normalize(t) for t in batch]
            encoded = sp.encode([cops.encode(t) for t in batch] if caseops else batch, num_threads=os.cpu_count() or 1)
            for text, ids in zip(batch, encoded):
                doc = np.empty(len(ids) + 1, dtype=np.uint16)
                doc[0] = bos_id
                doc[1:] = ids
                if index < val_docs:
                    val_hashes.append(doc_hash(doc[1:]))
                    side = None
                    if table is not None:
                        side = np.zeros(doc.size, dtype=np.int32)
                        side[1:] = cops.original_byte_counts(doc[1:], table)
                        want = len(text.encode("utf-8"))
                        if int(side.sum()) != want:
                            raise DataError(
                                f"{docs_jsonl}: document {index}: its tokens stand for {int(side.sum())} bytes but its "
                                f"normalised text has {want}; the tokenizer does not round-trip CaseOps text"
                            )
                    writers["val"].add(doc, side)
                    if index == val_docs - 1:
                        writers["val"].flush()  # validation ends its own last shard
                else:
                    writers["train"].add(doc)
                index += 1
            bar.update(len(batch))
    writers["train"].flush()

    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created_by": "pgolf data prepare",
        "tokenizer": {"file": tok_path.name, "sha256": sha256_file(tok_path), "vocab_size": int(sp.vocab_size())},
        "bos_id": bos_id,
        "transform": caseops_transform_record() if caseops else None,
        "train": split_record(writers["train"].records),
        "val": {**split_record(writers["val"].records), "doc_hashes": val_hashes},
        "source": {
            "kind": "jsonl",
            "docs_file": str(docs_jsonl.resolve()),
            "docs_sha256": sha256_file(docs_jsonl),
            "text_key": text_key,
            "docs": total_docs,
            "val_docs": val_docs,
            "shard_tokens": shard_tokens,
            "tokenizer_trained": bool(train_tokenizer),
            "tokenizer_source": None if tokenizer is None else str(Path(tokenizer).resolve()),
        },
    }
    write_manifest(out_dir, manifest)
    return manifest


def caseops_transform_record() -> dict[str, Any]:
    """The manifest's ``transform`` entry of CaseOps data."""
    from pgolf.data import caseops as cops

    return {
        "name": cops.TRANSFORM_NAME,
        "byte_sidecar": True,
        "operator_ids": {f"U+{ord(op):04X}": i for op, i in cops.OPERATOR_IDS.items()},
        "normalized_before_transform": True,
    }
