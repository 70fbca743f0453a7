"""Where the token shards and the tokenizer live, and which training loader reads them."""

from __future__ import annotations

from dataclasses import dataclass

LOADERS = ("stream", "shuffled", "coprime", "packed")
TRANSFORMS = ("none", "lossless_caps_caseops_v1")


@dataclass(kw_only=True)
class DataConfig:
    path: str = "./data/datasets/fineweb10B_sp1024"  # folder with the shards (DATA_PATH)
    train_glob: str = "fineweb_train_*.bin"
    val_glob: str = "fineweb_val_*.bin"  # byte sidecars (fineweb_val_bytes_*) are never taken as shards
    tokenizer: str = ""  # SentencePiece .model; "" = the one named by the folder's manifest.json
    # Training loader (frontier.md 3.11; pgolf.data.loaders): stream (the challenge's, R1), coprime
    # (R2/R3 coprime-stride multi-shard sampling), shuffled (R4/R5 ShuffledSequenceLoader), packed
    # (R6/R7 DocumentPackingLoader; needs model.doc_attention_window > 0).
    loader: str = "stream"
    loader_seed: int = 0  # shuffled: PCG64(rank + world * seed), seed 0 = the records; coprime: folded into the FNV seed
    # The text transform the data must have been made with (its manifest's "transform"): none, or
    # lossless_caps_caseops_v1 (R6/R7 CaseOps, with byte sidecars). Checked when training starts;
    # `pgolf run` builds the matching demo variant.
    transform: str = "none"

    def validate(self) -> None:
        from pgolf.errors import ConfigError

        if not self.train_glob or not self.val_glob:
            raise ConfigError("data.train_glob and data.val_glob must not be empty")
        if self.train_glob == self.val_glob:
            raise ConfigError("data.train_glob and data.val_glob must differ: validation tokens never train")
        if self.loader not in LOADERS:
            raise ConfigError(f"data.loader={self.loader!r} is unknown; use one of {', '.join(LOADERS)}")
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"data.transform={self.transform!r} is unknown; use one of {', '.join(TRANSFORMS)}")
        if self.loader_seed < 0:
            raise ConfigError(f"data.loader_seed must be >= 0 (got {self.loader_seed})")
