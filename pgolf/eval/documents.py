"""Document-level scoring (frontier.md 3.18): the validation stream split into documents, the
documents scored chunk by chunk in length-sorted batches. Phased TTT (``pgolf.eval.phased``) runs
this same scoring with adapters; with no adaptation it is the plain document-level eval.

Indexing as in ``pgolf.eval.sliding``: the stream ``v`` has N + 1 tokens, target i is ``v[i + 1]``
predicted from ``v[.. i]``.

* **Documents.** A document starts at position 0 and at every BOS; document k covers the targets
  ``[s_k, s_{k+1})``: its tokens run from its BOS up to and including the next document's BOS,
  which is its last target (worth 0 bytes); the last document runs to the end of the stream.
  The documents' targets tile ``[0, N)``, so their count and bytes are the standard eval's.
  (A stream that does not start with BOS gets a first document from position 0; one without any
  BOS is one document.)
* **Batches.** Documents sorted by length (targets) ascending, ties by position, cut into batches of
  ``batch_docs``; the queue runs the batches longest first (by their longest document).
* **Chunks.** Document-relative chunk c holds targets ``[c C, min((c + 1) C, n))`` (C =
  ``doc_chunk``, n the document's targets). All documents of a batch that still have chunk c are
  scored in one forward: each row is a window of the document's tokens from ``ws = max(0, (c + 1) C
  - L)`` (L the eval length) to its chunk end, right-padded with token 0 to a common length, and the
  rows score their chunk's positions ``[c C - ws, ...)``; padded positions are never scored.
  Every scored target sees at least ``L - C`` tokens of its document (or all of them), and nothing
  of any other document: rows are separate sequences and attention is causal, so padding after a
  row's end cannot reach it.
* **Ranks.** Batch q of the queue goes to rank ``q % world_size`` (static, deterministic); each rank
  writes the NLL of its targets into a stream-indexed vector, and the all-reduce checks that every
  target was scored exactly once (``StreamScores``).

Bytes: every byte count of the document path goes through ``target_bytes`` (global target
positions, previous ids, target ids), i.e. ``pgolf.eval.bpb.target_bytes``: the LUT rule, or the
per-token byte sidecar of CaseOps data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pgolf.eval.bpb import ByteCounter, EvalResult
from pgolf.eval.bpb import target_bytes as bpb_target_bytes
from pgolf.eval.sliding import StreamScores
from pgolf.eval.standard import autocast_context


def target_bytes(lut: ByteCounter, positions: Tensor, prev_ids: Tensor, target_ids: Tensor) -> Tensor:
    """Bytes of the targets at global target indices ``positions`` (same shapes; int32). The one
    byte call of document scoring and phased TTT: the LUT rule, or the per-token byte sidecar of
    CaseOps data (frontier.md 1.4), through ``pgolf.eval.bpb.target_bytes``."""
    return bpb_target_bytes(lut, positions, prev_ids, target_ids)


@dataclass(frozen=True)
class Documents:
    starts: Tensor  # int64 [D]: first target index of each document
    lengths: Tensor  # int64 [D]: targets of each document (>= 1)

    @property
    def count(self) -> int:
        return int(self.starts.numel())


def split_documents(tokens: Tensor, bos_id: int) -> Documents:
    """Documents of a stream of N + 1 tokens (see the module docstring)."""
    n = tokens.numel() - 1
    assert n >= 1, "the stream has no targets"
    bos = torch.nonzero(tokens[:n] == bos_id).flatten().cpu()
    starts = torch.unique(torch.cat((torch.zeros(1, dtype=torch.int64), bos.to(torch.int64))))
    ends = torch.cat((starts[1:], torch.tensor([n], dtype=torch.int64)))
    return Documents(starts, ends - starts)


def batch_queue(docs: Documents, batch_docs: int) -> list[Tensor]:
    """Document ids per batch (ascending length inside a batch), in queue order (longest first)."""
    order = sorted(range(docs.count), key=lambda k: (int(docs.lengths[k]), int(docs.starts[k])))
    batches = [order[i : i + batch_docs] for i in range(0, len(order), batch_docs)]
    queue = sorted(range(len(batches)), key=lambda b: (-int(docs.lengths[batches[b][-1]]), -b))
    return [torch.tensor(batches[b], dtype=torch.int64) for b in queue]


@dataclass
class ChunkBatch:
    """One forward of a batch: rows ``rows`` of the batch (the documents with chunk ``c``)."""

    c: int
    rows: slice
    x: Tensor  # [n, W] inputs (padded with 0)
    y: Tensor  # [n, W] targets (padded with 0)
    first: int  # first scored window position, the same for every row
    valid: Tensor  # bool [n, W - first]: scored positions
    positions: Tensor  # int64 [n, W - first]: global target index of each (valid) position
    has_next: Tensor  # bool [n]: the document has a later chunk (it trains on this one)


def chunk_batch(tokens: Tensor, docs: Documents, batch: Tensor, c: int, chunk: int, seq_len: int, device: torch.device) -> ChunkBatch | None:
    """The rows of batch ``batch`` (document ids, ascending length) that have chunk ``c``
    (``tokens`` on the CPU; the tensors go to ``device``)."""
    lengths = docs.lengths[batch]
    active = torch.nonzero(lengths > c * chunk).flatten()
    if active.numel() == 0:
        return None
    a = int(active[0])  # lengths ascend: the active documents are a suffix
    ids = batch[a:]
    n_doc, s_doc = docs.lengths[ids], docs.starts[ids]
    end_nominal = (c + 1) * chunk
    ws = max(0, end_nominal - seq_len)
    width = end_nominal - ws  # = min(end_nominal, seq_len)
    first = c * chunk - ws
    ends = torch.clamp(n_doc, max=end_nominal)  # document-relative chunk ends
    offs = torch.arange(width, dtype=torch.int64)
    rel = ws + offs[None, :]  # document-relative input position = target index
    inside = rel < ends[:, None]
    idx = torch.where(inside, s_doc[:, None] + rel, torch.zeros_like(rel))
    x = torch.where(inside, tokens[idx], torch.zeros_like(idx))
    y = torch.where(inside, tokens[idx + 1], torch.zeros_like(idx))
    valid = inside[:, first:]
    return ChunkBatch(
        c=c,
        rows=slice(a, int(batch.numel())),
        x=x.to(device, non_blocking=True),
        y=y.to(device, non_blocking=True),
        first=first,
        valid=valid.to(device),
        positions=idx[:, first:].to(device),
        has_next=(n_doc > end_nominal).to(device),
    )


def record_scores(scores: StreamScores, sums: Tensor, nll: Tensor, cb: ChunkBatch, lut: ByteCounter, order: Tensor | None = None, step: int = 0) -> None:
    """Write the scored NLLs of ``cb`` (nll [n, W - first], detached) into ``scores`` and add
    (nll, targets, bytes) to the float64 ``sums``; ``order`` (optional) gets ``step`` for them."""
    pos = cb.positions[cb.valid]
    vals = nll.detach()[cb.valid].to(torch.float64)
    prev = cb.x[:, cb.first :][cb.valid]
    tgt = cb.y[:, cb.first :][cb.valid]
    nbytes = target_bytes(lut, pos, prev, tgt).to(torch.int64)
    scores.nll.index_put_((pos,), vals, accumulate=True)
    scores.count.index_put_((pos,), torch.ones_like(pos, dtype=torch.int32), accumulate=True)
    scores.bytes += nbytes.sum()
    sums += torch.stack((vals.sum(), torch.tensor(float(pos.numel()), dtype=torch.float64, device=vals.device), nbytes.sum().to(torch.float64)))
    if order is not None:
        order[pos.to(order.device)] = step


def max_chunks(docs: Documents, batch: Tensor, chunk: int) -> int:
    return -(-int(docs.lengths[batch].max()) // chunk)


@torch.no_grad()
def evaluate_documents(
    model: nn.Module,
    val_tokens: Tensor,
    lut: ByteCounter,
    *,
    seq_len: int,
    chunk: int = 48,
    batch_docs: int = 64,
    bos_id: int = 1,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
    token_nll_out: Tensor | None = None,
) -> EvalResult:
    """Plain document-level val_loss / val_bpb: every target once, scored chunk by chunk inside its
    document, no adaptation (phased TTT with every learning rate 0 gives this bit for bit)."""
    t0 = time.perf_counter()
    device = torch.device(device)
    assert 1 <= chunk <= seq_len, f"chunk {chunk} must be between 1 and the eval length {seq_len}"
    tokens = val_tokens.to("cpu", torch.int64)
    docs = split_documents(tokens, bos_id)
    lut = lut.to(device)
    scores = StreamScores(tokens.numel() - 1, device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    queue = batch_queue(docs, batch_docs)
    with frozen(model):
        for q in range(rank, len(queue), world_size):
            batch = queue[q]
            for c in range(max_chunks(docs, batch, chunk)):
                cb = chunk_batch(tokens, docs, batch, c, chunk, seq_len, device)
                with autocast_context(device, autocast_dtype):
                    nll = model.token_nll(cb.x, cb.y, cb.first)
                record_scores(scores, sums, nll, cb, lut)
    res = scores.finish()
    if token_nll_out is not None:
        token_nll_out.copy_(scores.nll.to(token_nll_out.device, token_nll_out.dtype))
    return res.with_seconds(time.perf_counter() - t0)


class frozen:
    """Context manager: the model's parameters without requires_grad (restored on exit). Scoring
    runs with the base weights frozen in every document path, so the plain and the adapted
    forward use the same CPU kernels (they can differ in the last bit otherwise)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> nn.Module:
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.flags:
            p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc: object) -> None:
        for p, flag in self.flags:
            p.requires_grad_(flag)
