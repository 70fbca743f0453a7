"""Data identity at run time: the shards, the tokenizer and the manifest that describes them must
belong together, or a run trains and scores garbage with exit code 0.

Checked before anything is written (cheap: shard headers and one tokenizer hash, never a rehash
of the shards; ``pgolf data verify`` rehashes everything):

* the tokenizer's sha256 equals the manifest's (shards made with a 512-piece tokenizer evaluated
  with the 1024 one used to finish with a val_bpb);
* every training and validation shard the globs match is listed in the manifest, with the token
  count of its header (a stray shard is not silently trained on);
* without a manifest, every shard's header is checked and the run says it has no manifest.
"""

from __future__ import annotations

from pathlib import Path

from pgolf.data.manifest import MANIFEST_NAME, read_manifest
from pgolf.data.shards import shard_token_count
from pgolf.data.tokenizer import sha256_file
from pgolf.errors import DataError


def check_data_identity(data_dir: str | Path, train_files: list[Path], val_files: list[Path], tokenizer_path: str | Path) -> dict:
    """Raise DataError on a mismatch; return what was checked (for the run's log and artifact)."""
    data_dir = Path(data_dir)
    tok_sha = sha256_file(tokenizer_path)
    if not (data_dir / MANIFEST_NAME).is_file():
        for f in list(train_files) + list(val_files):
            shard_token_count(f)
        return {"manifest": None, "tokenizer_sha256": tok_sha, "shards_checked": len(train_files) + len(val_files)}
    manifest = read_manifest(data_dir)
    where = data_dir / MANIFEST_NAME
    want = manifest["tokenizer"]["sha256"]
    if tok_sha != want:
        raise DataError(
            f"tokenizer {tokenizer_path} (sha256 {tok_sha[:12]}) is not the one the shards in {data_dir} were made with "
            f"({manifest['tokenizer']['file']}, sha256 {want[:12]} in {where}); pass that file (or no --tokenizer)"
        )
    for split, files in (("train", train_files), ("val", val_files)):
        listed = {e["name"]: int(e["tokens"]) for e in manifest[split]["files"]}
        for f in files:
            f = Path(f)
            if f.name not in listed:
                raise DataError(f"{f}: this shard is not listed in {where} ({split}); remove it, or re-run "
                                "`pgolf data prepare`/`pgolf data fetch` so the manifest describes the folder")
            n = shard_token_count(f)
            if n != listed[f.name]:
                raise DataError(f"{f}: its header says {n} tokens but {where} lists {listed[f.name]}; "
                                "the shard was replaced or damaged: re-fetch or re-prepare it (`pgolf data verify` checks all)")
    return {"manifest": str(where), "tokenizer_sha256": tok_sha, "shards_checked": len(train_files) + len(val_files)}
