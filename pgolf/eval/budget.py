"""Eval-time budget: an estimate of how long an evaluation would take on 8xH100, from the FLOPs
of *this* model, so a user sees whether it fits the challenge's 600 s evaluation limit.

FLOPs are measured, not guessed: the model is rebuilt on the ``meta`` device (no memory, no
compute) and ``torch.utils.flop_counter.FlopCounterMode`` counts one forward of ``token_nll`` on a
window. Attention goes through PyTorch's math path there, so it is counted as two full T x T
matmuls per layer (a causal kernel does about half of that); this convention is the same in the
estimate and in the calibration below, so it cancels for models of the PR #401 shape. A forward
costs ``body(W) + head * scored`` (body: everything up to the final norm; head: LM head and
cross-entropy per scored position), measured at two ``first_scored`` values.

Throughput assumption (stated in every estimate): the counted FLOPs run at the rate the logged
records achieved with a model of this size on 8 x H100 SXM (989 TFLOP/s dense bf16 peak each):

* eval forward FLOPs (standard, sliding, TTT scoring): calibrated on PR #374's stride-64 sliding
  eval of the PR #401-shaped model at seq 2048, about 76 s for 62,021,632 targets
  (techniques.md section 22);
* TTT training FLOPs (forward + backward = 3 x forward): calibrated on the 2026-03-23 record's
  legal TTT (chunk 32,768, 3 epochs, seq 2048, about 410 s in all, section 15.4), after its
  scoring share is taken out at the eval rate. It is far below the eval rate: 1,893 sequential
  chunks of tiny per-GPU batches.

Phased TTT (``ttt.mode=phased``, R6/R7) is estimated from the document lengths of the stream
being evaluated, scaled to the official split's 50,000 documents. Document scoring: a forward of
each chunk's window, 3 forwards for a chunk that is trained on (the adapters' own FLOPs are left
out), at ``PHASED_SCORE_FLOPS_PER_SECOND``; the global SGD phases (3 forwards per trained token) at
the TTT training rate (the same small sequential SGD chunks; this gives 71 s for R7's three phases,
whose log shows 16-38 s each). The scoring rate is calibrated on R7 (pr1855 at seq 2048, 455.1 /
470.0 / 508.8 s, mean 478 s, frontier.md section 2) with document lengths taken from 2,700 FineWeb
sample documents (sp8192, median 1,262 tokens) rescaled to the official mean of 957 tokens
(47,851,520 / 50,000): 3.50e17 scoring FLOPs in 478 - 71 s, a third of the sliding-eval rate (the
LoRA backward, the head adapter and many short windows). The official split's length distribution
was not available, so this calibration carries that assumption.

Smaller or narrower models use the GPU less well than these records did, so for them the
estimate is a lower bound.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import asdict, dataclass

import torch

from pgolf.eval.config import TTTConfig
from pgolf.model.config import ModelConfig

H100_BF16_DENSE_PEAK = 989e12  # FLOP/s per H100 SXM, dense bf16 (NVIDIA datasheet)
GPUS = 8
OFFICIAL_VAL_TARGETS = 62_021_632  # fineweb_val_* targets of SP1024, as logged by R1/R2 and earlier
#: Official validation targets per tokenizer (frontier.md 1.1): the same 50,000 documents
#: are fewer tokens under a larger vocabulary (the key: vocab size, CaseOps transform or not).
OFFICIAL_VAL_TARGETS_BY_DATA = {(1024, False): 62_021_632, (4096, False): 45_508_608, (8192, False): 40_540_160,
                                (8192, True): 47_851_520}


def official_val_targets(vocab_size: int, caseops: bool = False) -> int:
    """The official split's scored targets for this tokenizer; for a vocabulary no record used,
    the nearest listed one's (the estimate is then approximate; the split's bytes are fixed, and
    tokens per byte change slowly with the vocabulary)."""
    if (vocab_size, caseops) in OFFICIAL_VAL_TARGETS_BY_DATA:
        return OFFICIAL_VAL_TARGETS_BY_DATA[(vocab_size, caseops)]
    near = min((k for k in OFFICIAL_VAL_TARGETS_BY_DATA if k[1] == caseops) or OFFICIAL_VAL_TARGETS_BY_DATA,
               key=lambda k: abs(k[0] - vocab_size))
    return OFFICIAL_VAL_TARGETS_BY_DATA[near]
OFFICIAL_VAL_DOCS = 50_000  # the validation split's documents, for every tokenizer (frontier.md 1.1)
EVAL_LIMIT_SECONDS = 600.0
# Calibration points (techniques.md sections 22 and 15.4).
CALIB_SLIDING_SECONDS = 76.0  # PR #374, seq 2048, stride 64
CALIB_TTT_SECONDS = 410.0  # 2026-03-23 record, legal TTT (chunk 32,768, 3 epochs, seq 2048, stride 64)
CALIB_SEQ_LEN, CALIB_STRIDE, CALIB_TTT_CHUNK, CALIB_TTT_EPOCHS = 2048, 64, 32_768, 3


@dataclass(frozen=True)
class ForwardCost:
    """Counted FLOPs of one ``token_nll`` forward on a window of ``window`` tokens."""

    window: int
    body: float  # FLOPs independent of the number of scored positions
    head: float  # FLOPs per scored position (LM head, softcap, cross-entropy)

    def flops(self, scored: int) -> float:
        return self.body + self.head * scored


def forward_cost(model_cfg: ModelConfig, window: int) -> ForwardCost:
    """Measured on the meta device (cached per config and window)."""
    return _forward_cost(json.dumps(asdict(model_cfg), sort_keys=True), window)


@functools.lru_cache(maxsize=32)
def _forward_cost(cfg_json: str, window: int) -> ForwardCost:
    from torch.utils.flop_counter import FlopCounterMode

    from pgolf.model.gpt import GPT

    cfg = ModelConfig(**json.loads(cfg_json))
    cfg.attention_backend = "sdpa"
    # Document-masked attention finds its segments in the ids, which the meta device cannot; its
    # FLOPs are counted as dense causal attention over the window (an upper bound).
    if getattr(cfg, "doc_attention_window", 0):
        cfg.doc_attention_window = 0
    with torch.device("meta"):
        model = GPT(copy.deepcopy(cfg))
        ids = torch.zeros(1, window, dtype=torch.int64)

    def count(first: int) -> float:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model.token_nll(ids, ids, first)
        return float(fc.get_total_flops())

    if window == 1:
        total = count(0)
        return ForwardCost(window, total, 0.0)
    all_scored, one_scored = count(0), count(window - 1)
    head = (all_scored - one_scored) / (window - 1)
    return ForwardCost(window, one_scored - head, head)


# ------------------------------------------------------------------------------------------------
# FLOPs of each evaluation


def standard_flops(model_cfg: ModelConfig, n_targets: int, seq_len: int) -> float:
    n_seq = math.ceil(n_targets / seq_len)
    return n_seq * forward_cost(model_cfg, seq_len).flops(seq_len)


def sliding_flops(model_cfg: ModelConfig, n_targets: int, seq_len: int, stride: int) -> float:
    window = min(seq_len, n_targets)
    n_windows = 1 + max(0, math.ceil((n_targets - seq_len) / stride))
    cost = forward_cost(model_cfg, window)
    return n_windows * cost.body + n_targets * cost.head


def ttt_train_flops(model_cfg: ModelConfig, n_targets: int, seq_len: int, ttt: TTTConfig) -> float:
    """Forward + backward (3 x forward) over every trained sequence of every chunk but the last
    (for LoRA, whose frozen weights need no weight gradients, this is an upper bound)."""
    T = ttt.seq_len or seq_len
    chunks = math.ceil(n_targets / ttt.chunk_tokens)
    T_eff = min(T, ttt.chunk_tokens)
    seqs_per_chunk = ttt.chunk_tokens // T_eff
    trained = max(0, chunks - 1) * seqs_per_chunk * ttt.epochs
    return 3.0 * trained * forward_cost(model_cfg, T_eff).flops(T_eff)


def phased_flops(model_cfg: ModelConfig, doc_lengths, seq_len: int, ttt: TTTConfig, n_docs: int = OFFICIAL_VAL_DOCS) -> tuple[float, float]:
    """(document scoring + LoRA FLOPs, global SGD FLOPs) of phased TTT on ``n_docs`` documents
    distributed like ``doc_lengths`` (targets per document of a sample)."""
    import numpy as np

    lengths = np.sort(np.asarray(doc_lengths, dtype=np.float64))[::-1]  # the queue runs longest first
    assert lengths.size > 0 and lengths.min() >= 1, "phased estimate: no documents"
    weight = n_docs / lengths.size
    C, L = ttt.doc_chunk, seq_len
    # body(w) = a w + b w^2 (linear layers, attention scores), fitted exactly at two windows.
    w1, w2 = max(1, L // 2), L
    b1, b2 = forward_cost(model_cfg, w1).body, forward_cost(model_cfg, w2).body
    b = (b2 / w2 - b1 / w1) / (w2 - w1)
    a = b1 / w1 - b * w1
    head = forward_cost(model_cfg, L).head
    k = np.ceil(lengths / C).astype(np.int64)  # chunks per document
    ks = np.arange(1, int(k.max()) + 1, dtype=np.float64)
    w = np.minimum(ks * C, L)
    body = a * w + b * w * w
    prefix = np.concatenate(([0.0], np.cumsum(body)))  # prefix[j] = sum of the first j chunk windows
    # a chunk with a later one: its scoring forward+backward, then grad_steps - 1 more of them
    g = 3.0 * max(1, ttt.grad_steps)
    per_doc = g * prefix[k - 1] + body[k - 1] + head * (g * C * (k - 1) + (lengths - C * (k - 1)))
    score = weight * float(per_doc.sum())
    T = ttt.seq_len or seq_len
    cum_tokens = np.concatenate(([0.0], np.cumsum(lengths)))
    sgd = 0.0
    for phase in range(ttt.phases):
        boundary = ttt.prefix_docs * (phase + 1) // ttt.phases
        if boundary <= 0 or boundary >= n_docs:
            continue
        docs = boundary / weight  # sample documents standing for the first ``boundary``
        j = min(int(docs), lengths.size)
        tokens = weight * (cum_tokens[j] + (docs - j) * (lengths[j] if j < lengths.size else 0.0))
        chunks = math.ceil(tokens / ttt.chunk_tokens)
        trained = max(0, chunks - 1) * ttt.chunk_tokens * ttt.global_epochs
        sgd += 3.0 * trained / min(T, ttt.chunk_tokens) * forward_cost(model_cfg, min(T, ttt.chunk_tokens)).flops(min(T, ttt.chunk_tokens))
    return score, sgd


# The two rates below are ``reference_rates(pr401 model)`` evaluated once and frozen: the FLOPs that the
# PR #401 model at seq 2048 (pgolf's pr401 preset) spends on the calibration evaluations, divided
# by their logged times. Freezing them keeps a training run (and a bundled train_gpt.py) from
# rebuilding the reference model; a test checks they still equal reference_rates().
EVAL_FLOPS_PER_SECOND = 2.5662093819697045e15
TTT_TRAIN_FLOPS_PER_SECOND = 1.6586687907361725e14
# Phased TTT's document scoring (see the module docstring for its calibration on R7).
PHASED_SCORE_FLOPS_PER_SECOND = 8.59e14


def reference_rates(ref: ModelConfig) -> tuple[float, float]:
    """(eval FLOP/s, TTT-training FLOP/s) on 8 x H100, recomputed from the two logged records;
    ``ref`` is the model they ran (the pr401 preset's; the caller loads it, eval sits below config)."""
    eval_flops = sliding_flops(ref, OFFICIAL_VAL_TARGETS, CALIB_SEQ_LEN, CALIB_STRIDE)
    eval_rate = eval_flops / CALIB_SLIDING_SECONDS
    ttt = TTTConfig(mode="sgd", chunk_tokens=CALIB_TTT_CHUNK, epochs=CALIB_TTT_EPOCHS)
    train_flops = ttt_train_flops(ref, OFFICIAL_VAL_TARGETS, CALIB_SEQ_LEN, ttt)
    train_rate = train_flops / (CALIB_TTT_SECONDS - CALIB_SLIDING_SECONDS)
    return eval_rate, train_rate


def calibrated_rates() -> tuple[float, float]:
    return EVAL_FLOPS_PER_SECOND, TTT_TRAIN_FLOPS_PER_SECOND


@dataclass(frozen=True)
class EvalBudget:
    n_targets: int
    standard_s: float
    sliding_s: float | None
    ttt_s: float | None
    eval_mfu: float
    ttt_train_mfu: float
    phased: bool = False

    @property
    def total_s(self) -> float:
        """What a submission's eval would run: the standard pass plus the scored pass."""
        return self.standard_s + (self.ttt_s if self.ttt_s is not None else (self.sliding_s or 0.0))

    @property
    def fits(self) -> bool:
        return self.total_s <= EVAL_LIMIT_SECONDS

    def assumption(self) -> str:
        return (
            f"8xH100 SXM, counted FLOPs at the records' throughput: eval {100 * self.eval_mfu:.0f}% of the "
            f"{H100_BF16_DENSE_PEAK / 1e12:.0f} TFLOP/s bf16 peak (PR #374 sliding eval, 76 s), TTT training "
            f"{100 * self.ttt_train_mfu:.1f}% (2026-03-23 record, 410 s); {self.n_targets:,} targets"
            f"{' (phased TTT: 50,000 documents like the evaluated ones)' if self.phased else ''}; lower bound for smaller models"
        )

    def as_dict(self) -> dict:
        return {
            "val_targets": self.n_targets,
            "standard_seconds": self.standard_s,
            "sliding_seconds": self.sliding_s,
            "ttt_seconds": self.ttt_s,
            "total_seconds": self.total_s,
            "limit_seconds": EVAL_LIMIT_SECONDS,
            "fits": self.fits,
            "assumption": self.assumption(),
        }

    def log_line(self) -> str:
        parts = [f"standard:{self.standard_s:.1f}s"]
        if self.sliding_s is not None:
            parts.append(f"sliding:{self.sliding_s:.1f}s")
        if self.ttt_s is not None:
            parts.append(f"ttt:{self.ttt_s:.1f}s")
        parts.append(f"total:{self.total_s:.1f}s limit:{EVAL_LIMIT_SECONDS:.0f}s fits:{self.fits}")
        return "eval_estimate_8xh100 " + " ".join(parts) + f" ({self.assumption()})"


def estimate_8xh100(
    model_cfg: ModelConfig,
    seq_len: int,
    stride: int = 0,
    ttt: TTTConfig | None = None,
    n_targets: int | None = None,
    doc_lengths=None,
    caseops: bool = False,
) -> EvalBudget:
    """Estimated 8xH100 seconds of the standard eval, the sliding eval (``stride`` > 0) and the
    score-first TTT eval (``ttt.mode != off``; it scores with the sliding windows, or with
    stride = seq_len when ``stride`` is 0) on ``n_targets`` targets (default: the official split
    under this model's tokenizer, :func:`official_val_targets`; ``caseops``: the CaseOps data).
    Phased TTT needs ``doc_lengths`` (targets per document of the evaluated stream)."""
    if n_targets is None:
        n_targets = official_val_targets(model_cfg.vocab_size, caseops)
    eval_rate, train_rate = calibrated_rates()
    peak = GPUS * H100_BF16_DENSE_PEAK
    std = standard_flops(model_cfg, n_targets, seq_len) / eval_rate
    sl = sliding_flops(model_cfg, n_targets, seq_len, stride) / eval_rate if stride else None
    tt = None
    if ttt is not None and ttt.mode == "phased":
        assert doc_lengths is not None, "the phased estimate needs the document lengths of a stream"
        score, sgd = phased_flops(model_cfg, doc_lengths, seq_len, ttt)
        tt = score / PHASED_SCORE_FLOPS_PER_SECOND + sgd / train_rate
    elif ttt is not None and ttt.mode != "off":
        score = sliding_flops(model_cfg, n_targets, seq_len, stride or seq_len) / eval_rate
        tt = score + ttt_train_flops(model_cfg, n_targets, seq_len, ttt) / train_rate
    phased = ttt is not None and ttt.mode == "phased"
    return EvalBudget(n_targets, std, sl, tt, eval_rate / peak, train_rate / peak, phased)
