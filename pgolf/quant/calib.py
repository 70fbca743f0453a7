"""Calibration tokens for GPTQ: the run's training shards, or text the model generates itself.

Calibrating on validation tokens was the challenge's most argued GPTQ question (field-notes 1.8);
here it cannot happen by construction:

* the only sources are the two classes below, and ``collect_hessians`` refuses anything else (no
  tensor of tokens, no path or glob from the caller);
* ``TrainTokens`` takes the run's *data config* and resolves ``data.train_glob`` itself; it refuses
  any file whose name matches ``data.val_glob`` (through ``TokenStream``), any file that is also
  matched by the validation glob, and any file whose bytes equal a validation shard's (a renamed
  or copied validation shard);
* ``SelfGenerated`` samples sequences from the trained model (temperature 0.8 by default, as the
  accepted records), starting from the BOS token: it reads no data at all.

Both are legal under the current convention as long as the work is counted in the training-time
ledger (the train loop logs ``gptq_seconds``).
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from pgolf.data.config import DataConfig
from pgolf.data.loader import TokenStream
from pgolf.data.shards import resolve_shards
from pgolf.errors import DataError

# ``RunConfig`` (pgolf.config) in the annotations below is a name only, never imported: quant sits
# below config in the layers; the bundle's config folding resolves annotation names by class name.


CANONICAL_VAL_GLOB = "fineweb_val_*"  # refused whatever data.val_glob says


def _manifest_val_digests(folder: Path) -> dict[int, set[str]]:
    """{file size: sha256s} of the validation shards listed in the folder's manifest.json (if any)."""
    from pgolf.data.shards import HEADER_BYTES

    path = folder / "manifest.json"
    out: dict[int, set[str]] = {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        for entry in manifest["val"]["files"]:
            out.setdefault(HEADER_BYTES + 2 * int(entry["tokens"]), set()).add(str(entry["sha256"]))
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no (readable) manifest: the name and content checks above still apply
    return out


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class TrainTokens:
    """``num_seqs`` sequences of ``seq_len`` tokens of the training shards of ``data_cfg`` (tokens
    the model has trained on), drawn the way the run's loader draws them: with ``data.loader``
    ``stream`` in order from the start of the shards (the challenge's stream); with a records'
    loader (``shuffled``, ``coprime``, ``packed``; ``pgolf.data.loaders.build_loader``) from a
    fresh instance of that loader for ``rank`` of ``world_size``, one rank's batch of
    ``batch_seqs`` x ``seq_len`` tokens per forward, as R2 (a new coprime loader), R4/R5
    (ShuffledSequenceLoader) and R6/R7 (the packed loader: one row of whole documents) did.
    ``bos_id`` / ``doc_window`` are the model's, for the packed loader."""

    def __init__(self, data_cfg: DataConfig, *, num_seqs: int, seq_len: int, batch_seqs: int = 8, rank: int = 0,
                 world_size: int = 1, bos_id: int = 1, doc_window: int | None = None):
        if not isinstance(data_cfg, DataConfig):
            raise TypeError("TrainTokens takes the run's DataConfig (cfg.data), not tokens or paths")
        if num_seqs <= 0 or seq_len <= 0:
            raise DataError(f"calibration needs num_seqs > 0 and seq_len > 0, got {num_seqs} x {seq_len}")
        folder = Path(data_cfg.path)
        files = resolve_shards(folder, data_cfg.train_glob, "training")
        for f in files:
            for pattern in (data_cfg.val_glob, CANONICAL_VAL_GLOB):
                if fnmatch.fnmatch(f.name, pattern):
                    raise DataError(f"{f}: a validation shard (name matches {pattern!r}) can never be calibration data")
        val_files = {Path(p).resolve() for p in globlib.glob(str(folder / data_cfg.val_glob))}
        val_files |= {Path(p).resolve() for p in globlib.glob(str(folder / CANONICAL_VAL_GLOB))}
        for f in files:
            if f.resolve() in val_files:
                raise DataError(f"{f}: matched by data.val_glob too; validation shards can never be calibration data")
        val_digests = _manifest_val_digests(folder)
        val_sizes: dict[int, list[Path]] = {}
        for v in val_files:
            val_sizes.setdefault(os.path.getsize(v), []).append(v)
        for f in files:
            # hash only when a size matches: full-size train shards (200 MB) differ from the val shard
            size = os.path.getsize(f)
            same_size, known = val_sizes.get(size, []), val_digests.get(size, set())
            if same_size or known:
                digest = _digest(f)
                if digest in known or any(digest == _digest(v) for v in same_size):
                    raise DataError(f"{f}: has the same bytes as a validation shard; validation tokens can never be calibration data")
        self._stream = TokenStream(files, data_cfg.val_glob)  # refuses names matching the val glob
        self.files = files
        self.data_cfg, self.loader_kind = data_cfg, getattr(data_cfg, "loader", "stream")
        self.rank, self.world_size, self.bos_id, self.doc_window = rank, world_size, bos_id, doc_window
        self.num_seqs, self.seq_len, self.batch_seqs = num_seqs, seq_len, max(1, batch_seqs)

    def batches(self, device: torch.device, progress: bool = False) -> Iterator[Tensor]:
        if self.loader_kind != "stream":
            yield from self._loader_batches(device)
            return
        done = 0
        while done < self.num_seqs:
            b = min(self.batch_seqs, self.num_seqs - done)
            chunk = self._stream.take(b * self.seq_len).astype(np.int64)
            yield torch.from_numpy(chunk).view(b, self.seq_len).to(device)
            done += b

    def _loader_batches(self, device: torch.device) -> Iterator[Tensor]:
        from pgolf.data.loaders import build_loader

        loader = build_loader(self.data_cfg, self.files, self.rank, self.world_size, device, doc_window=self.doc_window, bos_id=self.bos_id)
        done = 0
        while done < self.num_seqs:
            b = min(self.batch_seqs, self.num_seqs - done)
            x, _ = loader.next_batch(b * self.seq_len * self.world_size, self.seq_len, 1)  # packed: one row of b x seq_len tokens
            yield x
            done += b

    def describe(self) -> str:
        how = "in order" if self.loader_kind == "stream" else f"{self.loader_kind} loader, rank {self.rank}/{self.world_size}"
        return f"train shards ({len(self.files)} files, {how}, {self.num_seqs}x{self.seq_len} tokens)"


class SelfGenerated:
    """Sequences sampled autoregressively from ``model`` (no data read at all).

    Generation recomputes the whole prefix every step (no KV cache: the model has none); that is
    O(T^2) but only runs once, on ``num_seqs`` sequences in parallel batches."""

    def __init__(self, model: nn.Module, *, num_seqs: int, seq_len: int, temperature: float = 0.8, seed: int = 0,
                 bos_id: int = 1, batch_seqs: int = 16, amp_dtype: torch.dtype | None = None):
        if not hasattr(model, "forward_hidden") or not hasattr(model, "logits"):
            raise TypeError("SelfGenerated needs the trained pgolf GPT itself")
        if num_seqs <= 0 or seq_len <= 1 or temperature <= 0:
            raise DataError(f"self-generated calibration needs num_seqs > 0, seq_len > 1, temperature > 0; got {num_seqs}, {seq_len}, {temperature}")
        self.model = model
        self.num_seqs, self.seq_len, self.temperature = num_seqs, seq_len, temperature
        self.seed, self.bos_id, self.batch_seqs, self.amp_dtype = seed, bos_id, max(1, batch_seqs), amp_dtype

    @torch.no_grad()
    def generate(self, device: torch.device, count: int, generator: torch.Generator, progress: bool = False) -> Tensor:
        from pgolf.eval.standard import autocast_context

        ids = torch.full((count, 1), self.bos_id, dtype=torch.int64, device=device)
        steps = range(self.seq_len - 1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="self-generate", leave=False, dynamic_ncols=True, disable=None)
        was_training = self.model.training
        self.model.eval()
        try:
            for _ in steps:
                with autocast_context(device, self.amp_dtype):
                    logits = self.model.logits(self.model.forward_hidden(ids)[:, -1])
                probs = torch.softmax(logits.float() / self.temperature, dim=-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
                ids = torch.cat([ids, nxt], dim=1)
        finally:
            self.model.train(was_training)
        return ids

    def batches(self, device: torch.device, progress: bool = False) -> Iterator[Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        done = 0
        while done < self.num_seqs:
            b = min(self.batch_seqs, self.num_seqs - done)
            yield self.generate(device, b, generator, progress)
            done += b

    def describe(self) -> str:
        return f"self-generated ({self.num_seqs}x{self.seq_len} tokens, temperature {self.temperature})"


def check_source(source: object) -> None:
    if not isinstance(source, (TrainTokens, SelfGenerated)):
        raise TypeError(
            f"calibration source must be TrainTokens (the run's training shards) or SelfGenerated, got {type(source).__name__}; "
            "validation tokens can never be used for calibration"
        )


def calibration_seqs(cfg: RunConfig) -> int:
    """Sequences of calibration: ``quant.gptq_calib_seqs``, or with ``quant.gptq_calib_batches`` > 0
    that many of the records' batches, one rank's micro-batch each (train_batch_tokens /
    train.grad_accum_base tokens: 48 x 2048 on 8xH100, so R6/R7's 16 batches are 768 sequences)."""
    q = cfg.quant
    if q.gptq_calib_batches <= 0:
        return q.gptq_calib_seqs
    seq_len = q.gptq_calib_seq_len or cfg.train.train_seq_len
    micro = cfg.train.train_batch_tokens // max(cfg.train.grad_accum_base, 1)
    return max(1, q.gptq_calib_batches * micro // seq_len)


def calibration_source(cfg: RunConfig, model: nn.Module, amp_dtype: torch.dtype | None = None, *, rank: int = 0,
                       world_size: int = 1) -> TrainTokens | SelfGenerated:
    """The source named by ``cfg.quant.gptq_calib_source`` for a run config ``cfg`` (training
    tokens through the run's ``data.loader`` for ``rank`` of ``world_size``, or self-generated)."""
    q = cfg.quant
    seq_len = q.gptq_calib_seq_len or cfg.train.train_seq_len
    num_seqs = calibration_seqs(cfg)
    if q.gptq_calib_source == "self":
        return SelfGenerated(model, num_seqs=num_seqs, seq_len=seq_len, temperature=q.gptq_temperature,
                             seed=cfg.train.seed, bos_id=cfg.model.bos_id, amp_dtype=amp_dtype)
    micro_seqs = cfg.train.train_batch_tokens // max(cfg.train.grad_accum_base, 1) // seq_len
    batch_seqs = max(1, micro_seqs) if q.gptq_calib_batches > 0 else 8  # one record batch per forward
    return TrainTokens(cfg.data, num_seqs=num_seqs, seq_len=seq_len, batch_seqs=batch_seqs, rank=rank, world_size=world_size,
                       bos_id=cfg.model.bos_id, doc_window=cfg.model.doc_attention_window)
