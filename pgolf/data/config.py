"""Where the token shards and the tokenizer live."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class DataConfig:
    path: str = "./data/datasets/fineweb10B_sp1024"  # folder with the shards (DATA_PATH)
    train_glob: str = "fineweb_train_*.bin"
    val_glob: str = "fineweb_val_*.bin"
    tokenizer: str = ""  # SentencePiece .model; "" = the one named by the folder's manifest.json

    def validate(self) -> None:
        from pgolf.errors import ConfigError

        if not self.train_glob or not self.val_glob:
            raise ConfigError("data.train_glob and data.val_glob must not be empty")
        if self.train_glob == self.val_glob:
            raise ConfigError("data.train_glob and data.val_glob must differ: validation tokens never train")
