"""``pgolf data ...``: make, download, build and check data folders.

* ``prepare`` tokenizes a JSONL of documents into challenge-format shards (first N docs = validation).
* ``fetch`` downloads the challenge's published shards and tokenizer from the Hugging Face hub.
* ``demo`` builds (once) the embedded demo corpus and prints its folder.
* ``verify`` checks a folder against its manifest and proves train/val disjointness; exit 1 if not.
"""

from __future__ import annotations

import argparse
from typing import Any

from pgolf.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare, fetch, build or verify token shards")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    p = sub.add_parser("prepare", help="tokenize a JSONL of documents into shards + tokenizer + manifest")
    p.add_argument("--docs", required=True, metavar="FILE.jsonl", help="one JSON object per line with a text field")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="MODEL", help="SentencePiece .model to use (copied into DIR)")
    tok.add_argument("--train-tokenizer", action="store_true",
                     help="train a BPE tokenizer with the challenge's settings on the training docs")
    p.add_argument("--vocab-size", type=int, default=None, metavar="N",
                   help="pieces of the trained tokenizer (default 1024)")
    p.add_argument("--val-docs", type=int, required=True, metavar="N", help="the first N documents become validation")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N", help="tokens per shard (default 100M)")
    p.add_argument("--text-key", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--caseops", action="store_true",
                   help="CaseOps pipeline: case operators (ids 4-7), byte sidecars for the validation shards")
    p.add_argument("--overwrite", action="store_true", help="replace the shards and manifest already in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare)

    f = sub.add_parser("fetch", help="download the challenge's shards and tokenizer from the Hugging Face hub")
    f.add_argument("--variant", default="sp1024",
                   help="sp1024 (and the challenge's sp512, sp2048, byte260), sp4096, sp8192 or sp8192-caseops; "
                        "each from the repo that hosts it")
    f.add_argument("--train-shards", type=int, default=80, metavar="N",
                   help="training shards of 100M tokens (default 80)")
    f.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default ./data/datasets/fineweb10B_<dataset>, the records' layout)")
    f.add_argument("--repo-id", default=None,
                   help="dataset repo (default $MATCHED_FINEWEB_REPO_ID, else the variant's own repo)")
    f.add_argument("--remote-root", default=None,
                   help="folder in the repo (default datasets or $MATCHED_FINEWEB_REMOTE_ROOT_PREFIX)")
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    f.set_defaults(func=_fetch)

    d = sub.add_parser("demo", help="build the embedded demo corpus (cached) and print its folder")
    d.add_argument("--force", action="store_true", help="rebuild even if the cache exists")
    d.add_argument("--vocab-size", type=int, default=1024, metavar="N", help="tokenizer pieces (default 1024; 8192 for R4-R7)")
    d.add_argument("--caseops", action="store_true", help="the CaseOps variant (R6/R7): operators and byte sidecars")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=_demo)

    v = sub.add_parser("verify", help="check a data folder against its manifest and train/val disjointness")
    v.add_argument("dir", metavar="DIR")
    v.add_argument("--train-glob", default="fineweb_train_*.bin", help="training shards to re-hash")
    v.set_defaults(func=_verify)


def _summary(manifest: dict[str, Any], folder: Any) -> None:
    tok = manifest["tokenizer"]
    print(f"data folder: {folder}")
    print(f"tokenizer:   {tok['file']} ({tok['vocab_size']} pieces)")
    transform = manifest.get("transform")
    if transform:
        sidecar = sum(int(f["sidecar"]["bytes"]) for f in manifest["val"]["files"] if f.get("sidecar"))
        print(f"transform:   {transform['name']} (val bytes from the sidecar: {sidecar:,})")
    for split in ("val", "train"):
        s = manifest[split]
        print(f"{split + ':':<12} {s['docs']:>10,} docs {s['tokens']:>15,} tokens {len(s['files']):>4} files")


def _prepare(args: argparse.Namespace) -> int:
    from pgolf.data.prepare import prepare_dataset

    if args.tokenizer and args.vocab_size is not None:
        raise UserError("--vocab-size only applies with --train-tokenizer (a given --tokenizer has its own size)")
    manifest = prepare_dataset(
        args.docs, args.out, tokenizer=args.tokenizer, train_tokenizer=args.train_tokenizer,
        vocab_size=1024 if args.vocab_size is None else args.vocab_size,
        val_docs=args.val_docs, shard_tokens=args.shard_tokens,
        text_key=args.text_key, progress=not args.no_progress, overwrite=args.overwrite, caseops=args.caseops,
    )
    _summary(manifest, args.out)
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from pgolf.data.fetch import fetch_dataset

    manifest = fetch_dataset(
        args.variant, args.train_shards, args.out, repo_id=args.repo_id, remote_root=args.remote_root,
        progress=not args.no_progress,
    )
    from pgolf.data.fetch import default_out

    _summary(manifest, args.out or default_out(args.variant))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pgolf.data.demo import prepare_demo

    print(prepare_demo(force=args.force, progress=not args.no_progress, vocab_size=args.vocab_size, caseops=args.caseops))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pgolf.data.manifest import check_disjoint, verify_files

    rows = verify_files(args.dir, progress=True)
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['split']:<10} {r['name']:<{width}}  {r['status']}")
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        # Re-hashing needs readable shards; a damaged folder is reported as it is.
        print(f"FAILED: {len(bad)} file problem(s); train/val disjointness not checked until they are fixed")
        return 1
    overlap = check_disjoint(args.dir, args.train_glob, progress=True)
    print(
        f"train/val disjoint: {overlap['train_docs']:,} training docs re-hashed against "
        f"{overlap['val_docs']:,} validation docs: {overlap['overlapping_docs']:,} overlapping"
    )
    for h in overlap["overlap_hashes"][:10]:
        print(f"  overlapping document hash {h}")
    if overlap["overlapping_docs"]:
        print(f"FAILED: {overlap['overlapping_docs']} training document(s) are also validation documents")
        return 1
    print("OK")
    return 0
