"""Phased test-time training with per-document batched LoRA and global SGD phases (R6/R7,
frontier.md 3.18), on the model's one forward path, with torch.distributed for everything ranks
share.

The scoring is ``pgolf.eval.documents``: documents split at BOS, length-sorted batches of
``ttt.batch_docs`` run longest first, each batch scored chunk by chunk (``ttt.doc_chunk`` targets
per document per forward). This module adds the adaptation:

* **Per-document LoRA** (``pgolf.eval.lora``): one adapter per document of the batch on q, k, v,
  o, mlp (one set per virtual layer slot) and the LM head; rank ``doc_lora_rank``, scale
  ``doc_lora_alpha / rank``. For each chunk: one forward scores the chunk (its NLLs are recorded
  first), then, if a document has a later chunk, ``grad_steps`` AdamW steps (betas (0,
  ``doc_beta2``), eps ``doc_eps``, decoupled WD ``doc_weight_decay``, lr ``doc_lora_lr``) on
  sum over those documents of the mean NLL of their chunk (the 2nd and later steps recompute the
  forward). A document's adapter has only seen the chunks of that document already scored.
  Per batch B is reset to 0 and the optimizer state cleared; with ``warm_start_a`` A carries over
  between a rank's full batches within a phase (A is re-drawn otherwise); a batch with fewer than
  ``batch_docs`` documents gets its own fresh adapters, as in the records.
* **Global SGD phases**: boundaries ``floor(prefix_docs (k + 1) / phases)``. Phase k runs after
  the first queue batch at which at least that many documents are scored (only if a batch is left
  to score after it): every rank finishes its batches up to that point, the ranks all-gather the
  documents each has scored, sort them by (queue batch, position) and keep the first ``boundary``,
  and all run one pass of SGD on the base model, all parameters, over exactly those documents
  (their inputs and targets concatenated in that order, sequences of ``seq_len``, chunks of
  ``chunk_tokens`` targets, lr ``global_lr`` with cosine decay over the chunks and the last chunk
  skipped, momentum ``momentum``, ``global_epochs`` epochs, ``batch_seqs`` sequences per step over
  all ranks, gradients summed over ranks, clip ``grad_clip``). Then fresh adapters (A re-drawn).
  Phases are cumulative (phase 2 retrains on the first 2 P / 3 documents).
* **Ranks**: batch q goes to rank ``q % world_size``; the phase points are fixed in queue terms, so
  the documents scored before and after each phase do not depend on timing (the records' file
  counter and flag let ranks overshoot by a timing-dependent number of documents). Deterministic
  for a given world size; with ``warm_start_a = false`` the per-document results do not depend on
  the world size at all (A is drawn per batch), and the global SGD only by float summation order.

Legality (issue #1017): every target is scored before any update that used it: a LoRA step uses
the chunks of its document already scored, warm-started A the documents this rank scored before,
and a phase only documents that every rank reports as scored. ``pgolf audit causality --ttt
phased`` checks it by token flips in scoring order. With every learning rate 0 the result equals
``evaluate_documents`` bit for bit.

Differences from the records, stated: the global SGD sequences run through the model's own
attention, so they are document-masked exactly when the model is (``model.doc_attention_window``
> 0, as in pr1787/pr1855; the records mask with cu_seqlens) and attend across documents otherwise;
a document's last, partial chunk is scored in a window that starts where a full chunk's would (at
least L - C tokens of context, as for every chunk); eager mode (no compile warm-up).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from pgolf.eval.bpb import ByteCounter, EvalResult
from pgolf.eval.config import TTTConfig
from pgolf.eval.documents import ChunkBatch, batch_queue, chunk_batch, max_chunks, record_scores, split_documents
from pgolf.eval.lora import DocLoRA
from pgolf.eval.sliding import StreamScores
from pgolf.eval.standard import autocast_context
from pgolf.eval.ttt import sgd_pass


@dataclass(frozen=True)
class PhaseTrigger:
    phase: int  # 1-based
    boundary: int  # documents the phase trains on
    after_batch: int  # queue index of the last batch scored before it


@dataclass
class PhaseReport:
    phase: int
    boundary_docs: int
    after_batch: int
    docs_scored: int  # documents scored (all ranks) when it ran
    tokens: int  # training tokens of its documents
    sgd_steps: int
    sgd_seconds: float

    def as_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class PhasedOutcome:
    result: EvalResult
    documents: int
    batches: int
    phases: list[PhaseReport]
    segments: list[dict]  # per stretch between phases: docs, targets, bytes, val_loss, val_bpb, score_seconds
    lora_steps: int
    score_seconds: float  # forwards + LoRA steps (max over ranks)
    sgd_seconds: float
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            **self.result.as_dict(),
            "documents": self.documents,
            "batches": self.batches,
            "lora_steps": self.lora_steps,
            "score_seconds": self.score_seconds,
            "sgd_seconds": self.sgd_seconds,
            "phases": [p.as_dict() for p in self.phases],
            "segments": self.segments,
        }


def phase_triggers(doc_counts: list[int], prefix_docs: int, phases: int) -> list[PhaseTrigger]:
    """Phase k (1..K) after the first queue batch at which floor(P k / K) documents are scored,
    if a batch is left after it. ``doc_counts``: documents per queue batch."""
    cum = np.cumsum(doc_counts)
    out = []
    for k in range(phases):
        boundary = prefix_docs * (k + 1) // phases
        if boundary <= 0 or boundary > cum[-1]:
            continue
        q = int(np.searchsorted(cum, boundary))  # first q with cum[q] >= boundary
        if q < len(doc_counts) - 1:
            out.append(PhaseTrigger(k + 1, boundary, q))
    return out


def generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys (every rank derives the same seeds)."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


SEED_MAIN, SEED_BATCH = 11, 13


class PhasedTTT:
    """One phased TTT pass over a stream (every rank constructs one and calls ``run``)."""

    def __init__(
        self,
        model: nn.Module,
        val_tokens: Tensor,
        lut: ByteCounter,
        cfg: TTTConfig,
        *,
        seq_len: int,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        autocast_dtype: torch.dtype | None = None,
        bos_id: int = 1,
        record_order: bool = False,
    ):
        cfg.validate()
        if cfg.doc_chunk > seq_len:
            from pgolf.errors import ConfigError

            raise ConfigError(f"ttt.doc_chunk: {cfg.doc_chunk} is longer than the eval sequence length {seq_len}")
        self.cfg = cfg
        self.seq_len = seq_len
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.autocast_dtype = autocast_dtype
        self.model = copy.deepcopy(model)  # the artifact's model is never modified
        self.model.requires_grad_(False)
        self.model.eval()
        self.tokens = val_tokens.to("cpu", torch.int64)
        self.lut = lut.to(self.device)
        self.docs = split_documents(self.tokens, bos_id)
        self.queue = batch_queue(self.docs, cfg.batch_docs)
        self.triggers = phase_triggers([int(b.numel()) for b in self.queue], cfg.prefix_docs, cfg.phases)
        n = self.tokens.numel() - 1
        self.scores = StreamScores(n, self.device)
        self.sums = torch.zeros(len(self.triggers) + 1, 3, dtype=torch.float64, device=self.device)
        self.segment_seconds = [0.0] * (len(self.triggers) + 1)
        self.order = torch.full((n,), -1, dtype=torch.int64) if record_order else None
        self.step_id = 0
        self.lora_steps = 0
        self.phase_reports: list[PhaseReport] = []
        self.scored_batches: list[int] = []
        self.main: DocLoRA | None = None
        self.phase = 0  # phases run so far
        self.progress: Callable[[str], None] | None = None
        self._t0 = 0.0
        self._last_report = 0.0

    # ---- adapters -------------------------------------------------------------------------------
    def _new_lora(self, bsz: int, gen: torch.Generator) -> DocLoRA:
        c = self.cfg
        lora = DocLoRA(self.model, bsz, c.doc_lora_rank, c.doc_lora_alpha, c.doc_lora_targets)
        lora.reset(gen)
        return lora

    def _optimizer(self, lora: DocLoRA) -> torch.optim.Optimizer:
        c = self.cfg
        return torch.optim.AdamW(lora.parameters(), lr=c.doc_lora_lr, betas=(0.0, c.doc_beta2), eps=c.doc_eps,
                                 weight_decay=c.doc_weight_decay, fused=self.device.type == "cuda")

    def _batch_lora(self, q: int) -> tuple[DocLoRA, bool]:
        """The adapters for queue batch q and whether they are temporary (a short batch)."""
        n = int(self.queue[q].numel())
        if n < self.cfg.batch_docs:
            if self.main is not None:
                self.main.detach()
            return self._new_lora(n, generator(SEED_BATCH, q)), True
        if self.main is None:
            self.main = self._new_lora(n, generator(SEED_MAIN, self.phase, self.rank))
            if not self.cfg.warm_start_a:
                self.main.reset(generator(SEED_BATCH, q))
        else:
            if not self.main.attached:
                self.main.attach()
            self.main.reset(None if self.cfg.warm_start_a else generator(SEED_BATCH, q))
        return self.main, False

    # ---- one batch ------------------------------------------------------------------------------
    def process_batch(self, q: int) -> None:
        t0 = time.perf_counter()
        batch = self.queue[q]
        lora, temporary = self._batch_lora(q)
        opt = self._optimizer(lora)
        segment = self.phase
        n_chunks = max_chunks(self.docs, batch, self.cfg.doc_chunk)
        for c in range(n_chunks):
            cb = chunk_batch(self.tokens, self.docs, batch, c, self.cfg.doc_chunk, self.seq_len, self.device)
            lora.rows = cb.rows
            self.score_and_adapt(lora, opt, cb, segment)
            self.step_id += 1
            self._say(f"ttt_phased queue_batch:{q + 1}/{len(self.queue)} chunk:{c + 1}/{n_chunks} docs:{int(batch.numel())} "
                      f"phase:{self.phase} lora_steps:{self.lora_steps}")
        if temporary:
            lora.detach()
            if self.main is not None:
                self.main.attach()
        self.scored_batches.append(q)
        self.segment_seconds[segment] += time.perf_counter() - t0

    def forward(self, lora: DocLoRA, cb: ChunkBatch) -> Tensor:
        with autocast_context(self.device, self.autocast_dtype):
            return lora.token_nll(cb.x, cb.y, cb.first)

    def score(self, nll: Tensor, cb: ChunkBatch, segment: int) -> None:
        record_scores(self.scores, self.sums[segment], nll, cb, self.lut, self.order, self.step_id)

    def adapt(self, lora: DocLoRA, opt: torch.optim.Optimizer, nll: Tensor, cb: ChunkBatch) -> None:
        """One AdamW step on sum over documents with a later chunk of their mean chunk NLL."""
        valid = cb.valid.to(torch.float32)
        per_doc = (nll.float() * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)
        loss = (per_doc * cb.has_next.to(torch.float32)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.lora_steps += 1

    def score_and_adapt(self, lora: DocLoRA, opt: torch.optim.Optimizer, cb: ChunkBatch, segment: int) -> None:
        """Score the chunk first, then adapt on it (the legality condition; the causality audit
        fails a variant that swaps the two)."""
        train = bool(cb.has_next.any())
        with torch.set_grad_enabled(train):
            nll = self.forward(lora, cb)
        self.score(nll, cb, segment)
        if not train:
            return
        for step in range(self.cfg.grad_steps):
            if step:
                nll = self.forward(lora, cb)
            self.adapt(lora, opt, nll, cb)

    # ---- global SGD phases ----------------------------------------------------------------------
    def scored_documents(self) -> Tensor:
        """(queue batch, position, document id) of every document scored by any rank, gathered
        through torch.distributed, sorted by (batch, position)."""
        rows = [torch.stack((torch.full_like(self.queue[q], q), torch.arange(self.queue[q].numel()), self.queue[q]), 1)
                for q in self.scored_batches]
        mine = torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.int64)
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            mine = _all_gather_rows(mine, self.device)
        key = mine[:, 0] * (self.cfg.batch_docs + 1) + mine[:, 1]
        return mine[torch.argsort(key)]

    def phase_documents(self, trigger: PhaseTrigger) -> tuple[Tensor, int]:
        """The first ``boundary`` scored documents (ids), as the ranks report them, and the number
        of documents scored in all."""
        scored = self.scored_documents()
        assert scored.size(0) >= trigger.boundary, f"phase {trigger.phase}: {scored.size(0)} documents scored, {trigger.boundary} needed"
        expected = torch.cat([self.queue[q] for q in range(trigger.after_batch + 1)])[: trigger.boundary]
        chosen = scored[: trigger.boundary, 2]
        assert torch.equal(chosen, expected), f"phase {trigger.phase}: the ranks' scored documents are not the queue prefix"
        return chosen, int(scored.size(0))

    def run_phase(self, trigger: PhaseTrigger) -> None:
        t0 = time.perf_counter()
        if self.main is not None:
            if self.main.attached:
                self.main.detach()
            self.main = None  # fresh adapters (A re-drawn) after the phase
        doc_ids, n_scored = self.phase_documents(trigger)
        starts, lengths = self.docs.starts[doc_ids], self.docs.lengths[doc_ids]
        x_stream = torch.cat([self.tokens[s : s + n] for s, n in zip(starts.tolist(), lengths.tolist())])
        y_stream = torch.cat([self.tokens[s + 1 : s + n + 1] for s, n in zip(starts.tolist(), lengths.tolist())])
        c = self.cfg
        T = c.seq_len or self.seq_len
        n_tok = x_stream.numel()
        n_chunks = -(-n_tok // c.chunk_tokens)
        params = list(self.model.parameters())
        self.model.requires_grad_(True)
        self.model.train()
        opt = torch.optim.SGD(params, lr=c.global_lr, momentum=c.momentum)
        steps = 0
        for ch in range(n_chunks - 1):  # the last chunk is skipped, as in the records
            lo, hi = ch * c.chunk_tokens, min((ch + 1) * c.chunk_tokens, n_tok)
            t = T if hi - lo >= T else hi - lo
            n_seq = (hi - lo) // t
            x_all = x_stream[lo : lo + n_seq * t].view(n_seq, t)
            y_all = y_stream[lo : lo + n_seq * t].view(n_seq, t)
            lr = c.global_lr * 0.5 * (1.0 + math.cos(math.pi * ch / (n_chunks - 1)))
            steps += sgd_pass(self.model, params, opt, x_all, y_all, lr=lr, epochs=c.global_epochs, batch_seqs=c.batch_seqs,
                              grad_clip=c.grad_clip, rank=self.rank, world_size=self.world_size, device=self.device,
                              autocast_dtype=self.autocast_dtype, sam_rho=c.sam_rho)
        del opt
        self.model.requires_grad_(False)
        self.model.eval()
        self.phase += 1
        report = PhaseReport(trigger.phase, trigger.boundary, trigger.after_batch, n_scored, n_tok, steps, time.perf_counter() - t0)
        self.phase_reports.append(report)
        self._say(f"ttt_phased phase:{trigger.phase} docs:{trigger.boundary} (scored {n_scored}) tokens:{n_tok} "
                  f"sgd_steps:{steps} sgd_time:{1000 * report.sgd_seconds:.0f}ms", force=True)

    # ---- driver -------------------------------------------------------------------------------
    def _say(self, line: str, force: bool = False) -> None:
        now = time.perf_counter()
        if self.progress is None or self.rank != 0 or (not force and now - self._last_report < 10.0):
            return
        self._last_report = now
        self.progress(f"{line} elapsed:{now - self._t0:.1f}s")

    def run(self) -> PhasedOutcome:
        self._t0 = self._last_report = time.perf_counter()
        pending = list(self.triggers)
        mine = list(range(self.rank, len(self.queue), self.world_size))
        for i, q in enumerate(mine):
            while pending and q > pending[0].after_batch:
                self.run_phase(pending.pop(0))
            self.process_batch(q)
            s = self.sums.sum(0)
            bpb = float(s[0] / (math.log(2.0) * s[2])) if float(s[2]) > 0 else float("nan")
            self._say(f"ttt_phased batch:{i + 1}/{len(mine)} (queue {q + 1}/{len(self.queue)}) phase:{self.phase} "
                      f"lora_steps:{self.lora_steps} rank0_bpb_so_far:{bpb:.4f}")
        while pending:  # phases this rank has no batch after still need it in their collectives
            self.run_phase(pending.pop(0))
        return self._finish()

    def _finish(self) -> PhasedOutcome:
        res = self.scores.finish()
        sums = self.sums.clone()
        secs = torch.tensor(self.segment_seconds + [p.sgd_seconds for p in self.phase_reports], dtype=torch.float64, device=self.device)
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(secs, op=dist.ReduceOp.MAX)
        assert int(sums[:, 1].sum()) == res.targets, "phased TTT: per-phase counts disagree with the stream count"
        n_seg = len(self.segment_seconds)
        seg_secs, sgd_secs = secs[:n_seg].tolist(), secs[n_seg:].tolist()
        for p, s in zip(self.phase_reports, sgd_secs):
            p.sgd_seconds = s
        segments = []
        doc_counts = [int(b.numel()) for b in self.queue]
        bounds = [-1] + [t.after_batch for t in self.triggers] + [len(self.queue) - 1]
        for k in range(n_seg):
            nll, targets, nbytes = (float(v) for v in sums[k].cpu())
            seg = {"segment": k, "after_phase": k, "batches": bounds[k + 1] - bounds[k],
                   "docs": sum(doc_counts[bounds[k] + 1 : bounds[k + 1] + 1]), "targets": int(targets), "bytes": int(nbytes),
                   "score_seconds": seg_secs[k]}
            if targets > 0 and nbytes > 0:
                r = EvalResult.from_sums(nll, int(targets), nbytes)
                seg.update(val_loss=r.val_loss, val_bpb=r.val_bpb)
            segments.append(seg)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self._t0
        return PhasedOutcome(
            result=res.with_seconds(seconds),
            documents=self.docs.count,
            batches=len(self.queue),
            phases=self.phase_reports,
            segments=segments,
            lora_steps=self.lora_steps,
            score_seconds=sum(seg_secs),
            sgd_seconds=sum(sgd_secs),
        )


def _all_gather_rows(rows: Tensor, device: torch.device) -> Tensor:
    """All ranks' int64 [n_r, 3] rows, concatenated in rank order."""
    world = dist.get_world_size()
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([rows.size(0)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    m = max(int(s) for s in sizes)
    padded = torch.full((m, 3), -1, dtype=torch.int64, device=dev)
    padded[: rows.size(0)] = rows.to(dev)
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)]).cpu()


def evaluate_phased(
    model: nn.Module,
    val_tokens: Tensor,
    lut: ByteCounter,
    cfg: TTTConfig,
    *,
    seq_len: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
    bos_id: int = 1,
    progress: Callable[[str], None] | None = None,
    token_nll_out: Tensor | None = None,
) -> PhasedOutcome:
    """Phased TTT val_loss / val_bpb of ``val_tokens`` with ``model`` (left untouched)."""
    runner = PhasedTTT(model, val_tokens, lut, cfg, seq_len=seq_len, device=device, rank=rank, world_size=world_size,
                       autocast_dtype=autocast_dtype, bos_id=bos_id)
    runner.progress = progress
    out = runner.run()
    if token_nll_out is not None:
        token_nll_out.copy_(runner.scores.nll.to(token_nll_out.device, token_nll_out.dtype))
    return out
