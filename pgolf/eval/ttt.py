"""Legal, score-first test-time training (the PR #461 recipe, techniques.md section 15.4).

The N targets of the stream are cut into chunks of ``C = ttt.chunk_tokens`` targets (chunk c holds
targets ``[c C, min((c + 1) C, N))``). The sliding-window plan of ``pgolf.eval.sliding`` is used
unchanged; each window belongs to the chunk that holds its *first scored* target, so the windows
of one chunk are a contiguous run. For c = 0 .. n_chunks - 1, in stream order:

1. **score** every window of chunk c with the current weights (no gradients), windows split
   contiguously across ranks, per-target NLL written into the stream vector;
2. **adapt** on chunk c's targets only (never the last chunk): inputs ``v[cC : end]``, targets
   ``v[cC + 1 : end + 1]``, cut into sequences of ``ttt.seq_len`` (the eval seq len by default;
   a remainder shorter than one sequence is not trained on; a chunk shorter than one sequence is one
   sequence), ``ttt.epochs`` passes over them in order, ``ttt.batch_seqs`` sequences per optimizer
   step split contiguously across ranks (gradients all-reduced), global grad-norm clip, SGD with
   momentum, lr ``lr * (1 + cos(pi * c / (n_chunks - 1))) / 2`` (``ttt.lr``; ``ttt.lora_lr`` for lora).

Every target is scored by weights that have only been updated on targets scored before it (chunks
before its window's chunk, and a window never looks past its last scored target), which is the
legality condition of the README FAQ ("only on validation set tokens you've already evaluated").
``pgolf audit causality --mode ttt`` checks this dynamically.

Modes: ``sgd`` trains every parameter (the recorded recipe); ``lora`` freezes the model and trains
rank-r adapters ``x -> scale * B(A x)`` added to the linears named in ``ttt.lora_targets``
(B starts at zero, so the adapted model starts exactly at the artifact's model).

The phased protocol of R6/R7 (per-document LoRA, global SGD phases) is ``pgolf.eval.phased``; it
shares ``sgd_pass`` (the distributed SGD over sequences) with this module.

The adaptation always works on a deep copy: the caller's model (and the artifact it came from) is
never modified. With ``lr = 0`` the weights never move and the result equals the plain sliding
eval bit for bit (same windows, same per-target NLL vector).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.errors import ConfigError
from pgolf.eval.bpb import ByteLUT, EvalResult
from pgolf.eval.config import TTTConfig
from pgolf.eval.sliding import SlidingPlan, StreamScores, rank_slice, score_windows, sliding_plan
from pgolf.eval.standard import autocast_context
from pgolf.model.layers import CastedLinear


# ------------------------------------------------------------------------------------------------
# LoRA adapters


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable low-rank update: ``base(x) + scale * B(A(x))``."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = float(scale)
        bound = 1.0 / math.sqrt(base.in_features)
        a = torch.empty(rank, base.in_features, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        device = base.weight.device
        self.lora_a = nn.Parameter(a.to(device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=device))

    def forward(self, x: Tensor) -> Tensor:
        delta = F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return self.base(x) + self.scale * delta


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, CastedLinear)]


def attach_lora(model: nn.Module, targets: list[str], rank: int, scale: float, seed: int = 0) -> list[str]:
    """Freeze ``model`` and wrap every linear whose name is a target or ends in ``.<target>``
    (``c_q`` matches ``blocks.3.attn.c_q``; ``mlp.proj`` only the MLP projections). Returns the
    wrapped names. Adapter init uses its own generator, so every rank builds the same adapters."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = linear_names(model)
    gen = torch.Generator().manual_seed(seed)
    wrapped: list[str] = []
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            suffixes = sorted({n.split(".")[-1] for n in names} | {".".join(n.split(".")[-2:]) for n in names})
            raise ConfigError(f"ttt.lora_targets: {t!r} matches no linear layer; valid names include {', '.join(suffixes)}")
        for name in hits:
            if name in wrapped:
                continue
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, LoRALinear(getattr(parent, leaf), rank, scale, gen))
            wrapped.append(name)
    return wrapped


def prepare_ttt_model(model: nn.Module, cfg: TTTConfig) -> tuple[nn.Module, list[nn.Parameter]]:
    """A deep copy of ``model`` set up for ``cfg.mode``; returns (copy, trained parameters)."""
    adapted = copy.deepcopy(model)
    if cfg.mode == "lora":
        attach_lora(adapted, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha / cfg.lora_rank)
    elif cfg.mode == "sgd":
        for p in adapted.parameters():
            p.requires_grad_(True)
    else:
        raise ConfigError(f"ttt.mode: {cfg.mode!r} does not adapt; use sgd or lora")
    params = [p for p in adapted.parameters() if p.requires_grad]
    assert params, "test-time training has no trainable parameters"
    return adapted, params


# ------------------------------------------------------------------------------------------------
# the score-first loop


@dataclass(frozen=True)
class TTTOutcome:
    result: EvalResult
    chunks: int
    trained_chunks: int
    optimizer_steps: int
    score_seconds: float
    train_seconds: float


class ScoreFirstTTT:
    """One score-first pass over a stream. ``process_chunk`` scores chunk c and then adapts on
    it; that order is the legality condition (a subclass that swapped it would be illegal, and
    the causality audit catches exactly that)."""

    def __init__(
        self,
        model: nn.Module,
        val_tokens: Tensor,
        lut: ByteLUT,
        cfg: TTTConfig,
        *,
        seq_len: int,
        stride: int,
        batch_windows: int = 32,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        autocast_dtype: torch.dtype | None = None,
    ):
        cfg.validate()
        self.cfg = cfg
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.autocast_dtype = autocast_dtype
        self.batch_windows = batch_windows
        self.tokens = val_tokens.to(self.device)
        self.lut = lut.to(self.device)
        self.model, self.params = prepare_ttt_model(model, cfg)
        self.optimizer = torch.optim.SGD(self.params, lr=cfg.effective_lr, momentum=cfg.momentum)
        self.plan: SlidingPlan = sliding_plan(self.tokens.numel() - 1, seq_len, stride)
        n = self.plan.n_targets
        self.n_chunks = -(-n // cfg.chunk_tokens)
        chunk_of_window = self.plan.first_target() // cfg.chunk_tokens
        bounds = torch.searchsorted(chunk_of_window, torch.arange(self.n_chunks + 1, dtype=torch.int64))
        self.chunk_windows = [(int(bounds[c]), int(bounds[c + 1])) for c in range(self.n_chunks)]
        self.train_seq_len = cfg.seq_len or seq_len
        self.scores = StreamScores(n, self.device)
        self.steps = 0
        self.trained_chunks = 0
        self.score_seconds = 0.0
        self.train_seconds = 0.0

    # ---- the two phases -------------------------------------------------------------------------
    def chunk_range(self, c: int) -> tuple[int, int]:
        """Targets [lo, hi) of chunk c."""
        C = self.cfg.chunk_tokens
        return c * C, min((c + 1) * C, self.plan.n_targets)

    def chunk_lr(self, c: int) -> float:
        """Cosine decay across chunks: lr at chunk 0, 0 at the last chunk."""
        if self.n_chunks <= 1:
            return 0.0
        return self.cfg.effective_lr * 0.5 * (1.0 + math.cos(math.pi * c / (self.n_chunks - 1)))

    def score_chunk(self, c: int) -> None:
        t0 = time.perf_counter()
        w_lo, w_hi = self.chunk_windows[c]
        lo, hi = rank_slice(w_hi - w_lo, self.rank, self.world_size)
        self.model.eval()
        score_windows(
            self.model.token_nll, self.tokens, self.plan, w_lo + lo, w_lo + hi, self.lut, self.scores,
            batch_windows=self.batch_windows, device=self.device, autocast_dtype=self.autocast_dtype,
        )
        self.score_seconds += time.perf_counter() - t0

    def adapt_chunk(self, c: int) -> None:
        """Train on the targets of chunk c (and nothing after them)."""
        t0 = time.perf_counter()
        lo, hi = self.chunk_range(c)
        x_all, y_all = sequences(self.tokens, lo, hi, self.train_seq_len)
        assert lo + x_all.numel() <= hi, "TTT would train past its chunk"
        self.model.train()
        self.steps += sgd_pass(
            self.model, self.params, self.optimizer, x_all, y_all, lr=self.chunk_lr(c), epochs=self.cfg.epochs,
            batch_seqs=self.cfg.batch_seqs, grad_clip=self.cfg.grad_clip, rank=self.rank, world_size=self.world_size,
            device=self.device, autocast_dtype=self.autocast_dtype, sam_rho=self.cfg.sam_rho,
        )
        self.trained_chunks += 1
        self.train_seconds += time.perf_counter() - t0

    def process_chunk(self, c: int) -> None:
        """Score first, then adapt (never on the last chunk: nothing is left to score)."""
        self.score_chunk(c)
        if c < self.n_chunks - 1:
            self.adapt_chunk(c)

    # ---- driver -------------------------------------------------------------------------------
    def run(self, progress: bool = False) -> TTTOutcome:
        t0 = time.perf_counter()
        bar = None
        if progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.n_chunks, desc=f"ttt {self.cfg.mode}", unit="chunk", leave=False, dynamic_ncols=True, disable=None)
        try:
            for c in range(self.n_chunks):
                self.process_chunk(c)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        res = self.scores.finish()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return TTTOutcome(
            result=res.with_seconds(time.perf_counter() - t0),
            chunks=self.n_chunks,
            trained_chunks=self.trained_chunks,
            optimizer_steps=self.steps,
            score_seconds=self.score_seconds,
            train_seconds=self.train_seconds,
        )


def sequences(stream: Tensor, lo: int, hi: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """Inputs ``stream[lo : ...]`` and targets one token later, cut into sequences of ``seq_len``
    inside targets ``[lo, hi)`` (a remainder shorter than one sequence is dropped; a range shorter
    than one sequence is one sequence)."""
    T = seq_len if hi - lo >= seq_len else hi - lo
    n_seq = (hi - lo) // T
    return stream[lo : lo + n_seq * T].view(n_seq, T), stream[lo + 1 : lo + n_seq * T + 1].view(n_seq, T)


def sgd_pass(
    model: nn.Module,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    x_all: Tensor,
    y_all: Tensor,
    *,
    lr: float,
    epochs: int,
    batch_seqs: int,
    grad_clip: float,
    rank: int,
    world_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    sam_rho: float = 0.0,
) -> int:
    """``epochs`` passes over the sequences in order, ``batch_seqs`` per optimizer step over all
    ranks (split contiguously), the mean token loss of the step's sequences, gradients summed over
    ranks, global-norm clip, one step; returns the number of steps. ``sam_rho`` > 0 (ttt.sam_rho):
    each step's gradient is taken at the SAM-perturbed weights (:func:`sam_gradients`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    n_seq, T = x_all.shape
    gradients = plain_gradients if sam_rho <= 0 else sam_gradients  # chosen once, not per step
    steps = 0
    for _ in range(epochs):
        for b0 in range(0, n_seq, batch_seqs):
            nb = min(batch_seqs, n_seq - b0)
            r_lo, r_hi = rank_slice(nb, rank, world_size)

            def backward(r_lo=r_lo, r_hi=r_hi, b0=b0, nb=nb) -> None:
                if r_hi > r_lo:
                    x = x_all[b0 + r_lo : b0 + r_hi].to(device)
                    y = y_all[b0 + r_lo : b0 + r_hi].to(device)
                    with autocast_context(device, autocast_dtype):
                        loss = model.token_nll(x, y, 0).float().sum() / (nb * T)
                    loss.backward()

            gradients(params, backward, sam_rho, world_size)
            optimizer_step(params, optimizer, grad_clip, world_size)
            steps += 1
    return steps


def plain_gradients(params: list[nn.Parameter], backward, rho: float, world_size: int) -> None:
    """This rank's gradient at the current weights."""
    backward()


def sam_gradients(params: list[nn.Parameter], backward, rho: float, world_size: int) -> None:
    """SAM (Foret et al. 2021): g = the gradient at w (summed over ranks, so every rank perturbs
    alike), e = rho * g / ||g|| (global L2 norm), then ``p.grad`` = this rank's gradient at w + e;
    the weights are restored exactly (copied back) before the caller's optimizer step."""
    backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        for g in grads:
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
    norm = torch.sqrt(sum(g.to(torch.promote_types(g.dtype, torch.float32)).square().sum() for g in grads))
    scale = rho / (norm + 1e-12)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(g * scale.to(g.dtype))
            p.grad = None
    backward()
    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)


def optimizer_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, grad_clip: float, world_size: int) -> None:
    """All-reduce (sum) the gradients over ranks, clip the global norm, step, clear."""
    for p in params:
        if p.grad is None:  # a rank without sequences in this batch still joins the all-reduce
            p.grad = torch.zeros_like(p)
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        for p in params:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def evaluate_ttt(
    model: nn.Module,
    val_tokens: Tensor,
    lut: ByteLUT,
    cfg: TTTConfig,
    *,
    seq_len: int,
    stride: int,
    batch_windows: int = 32,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    token_nll_out: Tensor | None = None,
) -> TTTOutcome:
    """Score-first TTT val_loss / val_bpb of ``val_tokens`` with ``model`` (left untouched)."""
    runner = ScoreFirstTTT(
        model, val_tokens, lut, cfg, seq_len=seq_len, stride=stride, batch_windows=batch_windows,
        device=device, rank=rank, world_size=world_size, autocast_dtype=autocast_dtype,
    )
    out = runner.run(progress)
    if token_nll_out is not None:
        token_nll_out.copy_(runner.scores.nll.to(token_nll_out.device, token_nll_out.dtype))
    return out
