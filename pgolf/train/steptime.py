"""Step-time model for 8 x H100: ms per training step, steps within the wallclock, serialisation
and evaluation seconds of a run, from the model's FLOPs and communication volume, calibrated on the
records' logged times.

One optimizer step on one GPU (``step_seconds``) is

    overhead + (linear + Newton-Schulz FLOPs) / matmul rate + attention FLOPs / attention rate
             + communication bytes / NVLink bandwidth

* linear FLOPs: 3 x (forward + backward = 3 x forward) the FLOPs per token of every matmul outside
  attention (blocks, LM head, cross-entropy), times the tokens per GPU (train_batch_tokens / 8);
  counted with ``FlopCounterMode`` on the meta device, with the loops off or on, at train_seq_len
  and half of it: forward(T) = a T + b T^2 separates the linear part (a) from attention (b T).
* attention FLOPs: 3 x b T per token. They are counted as two full T x T matmuls per layer (SDPA's
  math path, as pgolf.eval.budget does), and document-masked attention (R6/R7) as dense causal:
  the fitted attention rate absorbs the causal half and the kernel's efficiency.
* Newton-Schulz: 4 m^2 n + 2 m^3 FLOPs per iteration for every Muon matrix (m <= n its sides),
  optim.muon_backend_steps iterations (Polar-Express runs at most 5); the slowest rank's share under
  optim.muon_layout (round_robin: matrix i on rank i mod 8; sharded: ceil(B / 8) matrices of each
  same-shape bank per rank). It runs at the fitted matmul rate.
* communication: ring-collective bytes per GPU at ``NVLINK_BUS_BYTES_PER_SECOND`` (not fitted):
  round_robin: DDP's all-reduce of every gradient (fp32) + the all-reduce of the bf16 Muon updates;
  NorMuon: DDP's all-reduce + the all-gather of the updated fp32 matrices; sharded: reduce-scatter
  of the bf16 matrix grads + all-gather of the bf16 updates (banks padded to a multiple of 8) +
  all-reduce of the replicated (embedding, scalar) grads.
* overhead: everything per step that does not scale with those (optimizer and EMA element-wise
  work, kernel launches, data loading).

The three constants (overhead, matmul rate, attention rate) are fitted by least squares on the
relative error over the records' logged step times (``RECORDS``): a record whose loops switch on
gives two step times, before the switch (switch time / switch step) and after it. They are frozen
in ``FITTED`` so that ``pgolf inspect`` does not refit; ``fit_constants()`` recomputes them and a
test checks they agree. Refit and print the record table with

    python -m pgolf.train.steptime --refit

Steps within the wallclock (``schedule``): training time = max_wallclock_seconds minus the GPTQ
reserve (quant.gptq_reserve_seconds when quant.gptq = full; -1 = auto reserves the predicted
Hessian time + 20%); the loops switch on at the first step whose training fraction reaches
model.loop_enable_at, and training stops after the step that reaches the cap (or at
train.iterations). The compile warm-up steps are outside the clock and not counted.

Serialisation (``serialisation_seconds``): GPTQ Hessian collection = calibration tokens per rank x
(forward FLOPs per token with the loops on + 2 c^2 FLOPs per token for each Hessian of a c-column
input) / a fitted rate + a fitted fixed cost, calibrated on the Hessian times of R3-R7; the GPTQ
column solve and the compression are not logged by any record and use stated assumptions
(``GPTQ_SECONDS_PER_COLUMN``, ``CODEC_MB_PER_SECOND``). Evaluation: pgolf.eval.budget's
``estimate_8xh100`` (its own calibration on the records); phased TTT there needs document lengths,
which a preset does not have: ``synthetic_doc_lengths`` stands in for the official split.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from pgolf.eval.budget import H100_BF16_DENSE_PEAK, OFFICIAL_VAL_DOCS, estimate_8xh100, official_val_targets
from pgolf.model.config import ModelConfig

GPUS = 8
#: NCCL ring bus bandwidth per GPU over NVLink 4 (H100 SXM: 18 links x 25 GB/s per direction);
#: a stated assumption, not fitted (communication is < 1% of a record's step).
NVLINK_BUS_BYTES_PER_SECOND = 450e9


# ------------------------------------------------------------------------------------------------
# The records' logged training times (frontier.md section 2, techniques.md sections 17 and 22)


@dataclass(frozen=True)
class Record:
    name: str
    preset: str
    ms_per_step: float  # the log's step_avg (mean over seeds)
    steps: float  # steps reached (mean over seeds)
    train_seconds: float  # the log's train time at the stop
    loop_on_step: float | None = None  # the step at which layer loops switched on (mean over seeds)
    source: str = ""


RECORDS: tuple[Record, ...] = (
    Record("baseline", "baseline", 43.54, 13_780, 600.038, None,
           "openai/parameter-golf records/track_10min_16mb/2026-03-17_NaiveBaseline (train_time 600038 ms, step_avg 43.54 ms)"),
    Record("PR #89", "pr89", 50.3, 11_920, 600.0, None, "techniques.md 17: 11,917 / 11,925 / 11,917 steps at 50.3 ms"),
    Record("PR #201", "pr201", 89.37, 6_715, 600.0, None, "techniques.md 17: 6,715 steps at 89.37 ms (a slower host, section 22)"),
    Record("PR #401", "pr401", 86.44, 6_942, 600.0, None, "techniques.md 17/22: the identical-shape PR #374, 6,942 steps at 86.44 ms"),
    Record("R1", "pr549", 83.35, 7_185, 600.1, None, "frontier.md 2: 7,179 / 7,182 / 7,193 steps, 83.3-83.4 ms, 600.1 s"),
    Record("R3", "pr1218", 98.9, 5_963, 590.0, None, "frontier.md 2: 5,962 / 5,967 / 5,961 steps, 98.9 ms, 590.0 s"),
    Record("R4", "pr1394", 117.9, 4_989, 588.0, 2_892, "frontier.md 2: 4,986-4,992 steps, 117.9 ms, 588.0 s, loops on at step 2,892"),
    Record("R5", "pr1493", 129.2, 4_554, 588.0, 2_018, "frontier.md 2: 4,550 / 4,557 / 4,555 steps, 129.2 ms, 588.0 s, loops on at 2,018"),
    Record("R6", "pr1787", 120.8, 4_961, 599.53, 2_189, "frontier.md 2: 4,961 / 4,957 / 4,964 steps, 120.8 ms, 599.5 s, loops on at 2,188-2,190"),
    Record("R7", "pr1855", 121.67, 4_931, 599.52, 2_178, "frontier.md 2: 4,945 / 4,932 / 4,917 steps, 121.3-122.0 ms, 599.5 s, loops on at 2,172-2,183"),
)


def record_step_times(rec: Record, loop_enable_at: float) -> list[tuple[bool, float]]:
    """(loops on?, seconds per step) observed in a record: one value, or the step time before and
    after the loops switched on (at training fraction ``loop_enable_at`` of its train time)."""
    if rec.loop_on_step is None:
        return [(False, rec.train_seconds / rec.steps)]
    t_on = loop_enable_at * rec.train_seconds
    return [(False, t_on / rec.loop_on_step), (True, (rec.train_seconds - t_on) / (rec.steps - rec.loop_on_step))]


# ------------------------------------------------------------------------------------------------
# FLOPs and bytes of one step


@dataclass(frozen=True)
class StepFeatures:
    """Per-GPU work of one optimizer step."""

    linear_flops: float
    attention_flops: float
    ns_flops: float
    comm_bytes: float
    tokens_per_gpu: float
    virtual_layers: int


@functools.lru_cache(maxsize=64)
def _forward_split(cfg_json: str, seq_len: int, looping: bool) -> tuple[float, float, float]:
    """(linear FLOPs per token, attention FLOPs per token at seq_len, Hessian X^T X FLOPs per
    token) of one forward, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from pgolf.model.gpt import GPT

    cfg = ModelConfig(**json.loads(cfg_json))
    cfg.attention_backend = "sdpa"
    cfg.doc_attention_window = 0  # counted as dense causal (the meta device has no documents)
    with torch.device("meta"):
        model = GPT(copy.deepcopy(cfg))
    model.set_looping(looping)

    def count(T: int) -> float:
        ids = torch.zeros(1, T, dtype=torch.int64, device="meta")
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model.token_nll(ids, ids, 0)
        return float(fc.get_total_flops())

    t1, t2 = seq_len, max(1, seq_len // 2)
    f1, f2 = count(t1), count(t2)
    b = (f1 / t1 - f2 / t2) / (t1 - t2) if t1 != t2 else 0.0
    a = f1 / t1 - b * t1
    # One Hessian per distinct Linear input of each block pass (c_q / c_k / c_v share theirs), 2 c^2
    # FLOPs per token each; the final norm's output (the head's input) with gptq_embed.
    passes = model.encoder_layers + model.decoder_layers + model.lane_layers
    xtx = 0.0
    for i in passes:
        for name, mod in model.blocks[i].named_modules():
            w = getattr(mod, "weight", None)
            if w is None or w.ndim != 2 or w.numel() <= 65_536 or name.endswith(("c_k", "c_v")):
                continue
            xtx += 2.0 * w.shape[1] ** 2
    return a, b * seq_len, xtx + 2.0 * cfg.model_dim ** 2


def _ns_flops_per_matrix(shape, steps: int) -> float:
    m, n = sorted((int(shape[-2]), int(shape[-1])))
    return steps * (4.0 * m * m * n + 2.0 * m ** 3)


@functools.lru_cache(maxsize=64)
def _matrix_shapes(cfg_json: str) -> tuple[tuple[tuple[int, int], ...], int, int]:
    """(Muon matrix shapes in group order, their parameters, all parameters) of the model."""
    from pgolf.model.gpt import GPT
    from pgolf.optim.groups import split_parameters

    cfg = ModelConfig(**json.loads(cfg_json))
    cfg.attention_backend = "sdpa"
    with torch.device("meta"):
        model = GPT(cfg)
    shapes = tuple(tuple(p.shape) for _, p in split_parameters(model).matrix)
    n_mat = sum(math.prod(s) for s in shapes)
    return shapes, n_mat, sum(p.numel() for p in model.parameters())


def step_features(cfg, looping: bool, world: int = GPUS) -> StepFeatures:
    """The per-GPU FLOPs and bytes of one training step of run config ``cfg`` on ``world`` GPUs."""
    cfg_json = json.dumps(asdict(cfg.model), sort_keys=True)
    T = cfg.train.train_seq_len
    a, att, _ = _forward_split(cfg_json, T, looping)
    tokens = cfg.train.train_batch_tokens / world
    o = cfg.optim
    shapes, n_mat, n_all = _matrix_shapes(cfg_json)
    steps = min(o.muon_backend_steps, 5) if o.muon_ns == "polar_express" else o.muon_backend_steps
    ring = (world - 1) / world
    if o.muon_layout == "sharded":
        banks: dict[tuple[int, int], int] = {}
        for s in shapes:
            banks[s] = banks.get(s, 0) + 1
        ns = sum(math.ceil(k / world) * _ns_flops_per_matrix(s, steps) for s, k in banks.items())
        padded = sum(math.ceil(k / world) * world * math.prod(s) for s, k in banks.items())
        comm = ring * 2 * padded * 2 + 2 * ring * 4 * (n_all - n_mat)
    else:
        loads = [0.0] * world
        for i, s in enumerate(shapes):
            loads[i % world] += _ns_flops_per_matrix(s, steps)
        ns = max(loads)
        update = ring * 4 * n_mat if o.matrix_optimizer == "normuon" else 2 * ring * 2 * n_mat
        comm = 2 * ring * 4 * n_all + update
    n_virtual = len(cfg.model.virtual_layers(looping))
    return StepFeatures(3.0 * a * tokens, 3.0 * att * tokens, ns, comm, tokens, n_virtual)


# ------------------------------------------------------------------------------------------------
# The fitted constants


@dataclass(frozen=True)
class StepConstants:
    overhead_s: float  # per step
    matmul_flops_per_s: float  # per GPU, linear layers and Newton-Schulz
    attention_flops_per_s: float  # per GPU, attention FLOPs counted as full T x T matmuls

    def describe(self) -> str:
        return (f"overhead {1e3 * self.overhead_s:.2f} ms/step, matmul {self.matmul_flops_per_s / 1e12:.0f} TFLOP/s/GPU "
                f"({100 * self.matmul_flops_per_s / H100_BF16_DENSE_PEAK:.0f}% of the bf16 peak), attention "
                f"{self.attention_flops_per_s / 1e12:.0f} TFLOP/s/GPU (full-T^2 count), NVLink "
                f"{NVLINK_BUS_BYTES_PER_SECOND / 1e9:.0f} GB/s (assumed)")


def step_seconds(f: StepFeatures, c: StepConstants) -> float:
    return (c.overhead_s + (f.linear_flops + f.ns_flops) / c.matmul_flops_per_s
            + f.attention_flops / c.attention_flops_per_s + f.comm_bytes / NVLINK_BUS_BYTES_PER_SECOND)


def _load(preset: str):
    from pgolf.config import load_config

    return load_config(preset, "8xh100", [])


def fit_constants(records: tuple[Record, ...] = RECORDS) -> StepConstants:
    """Least squares on the relative step-time error over every observed step time of ``records``
    (non-negative coefficients; the communication term is known and taken off first)."""
    from scipy.optimize import nnls

    rows, ys = [], []
    for rec in records:
        cfg = _load(rec.preset)
        for looping, seconds in record_step_times(rec, cfg.model.loop_enable_at):
            f = step_features(cfg, looping)
            rows.append([1.0, f.linear_flops + f.ns_flops, f.attention_flops])
            ys.append((seconds, f.comm_bytes / NVLINK_BUS_BYTES_PER_SECOND))
    X = np.array(rows)
    y = np.array([s - c for s, c in ys])
    w = 1.0 / np.array([s for s, _ in ys])
    coef, _ = nnls(X * w[:, None], y * w)
    assert coef[1] > 0 and coef[2] > 0, f"degenerate step-time fit {coef}"
    return StepConstants(float(coef[0]), float(1.0 / coef[1]), float(1.0 / coef[2]))


#: ``fit_constants()`` evaluated once and frozen (python -m pgolf.train.steptime --refit prints it).
FITTED = StepConstants(overhead_s=0.01808251482348412, matmul_flops_per_s=355779690740108.1, attention_flops_per_s=583171863674435.2)


# ------------------------------------------------------------------------------------------------
# Serialisation


@dataclass(frozen=True)
class HessianRecord:
    name: str
    preset: str
    seconds: float
    source: str


HESSIAN_RECORDS: tuple[HessianRecord, ...] = (
    HessianRecord("R3", "pr1218", 8.2, "frontier.md 2: GPTQ 8.2 s (66 Hessians, 64 batches)"),
    HessianRecord("R4", "pr1394", 11.2, "frontier.md 2: Hessians 11.2 s (67, 64 batches, loops on)"),
    HessianRecord("R5", "pr1493", 12.7, "frontier.md 2: Hessians 12.7 s (seed 42, 64 batches)"),
    HessianRecord("R6", "pr1787", 3.5, "frontier.md 2: Hessians 3.5 s (16 batches)"),
    HessianRecord("R7", "pr1855", 4.73, "frontier.md 2: Hessians 4.7 / 4.9 / 4.6 s (16 batches)"),
)


def calib_tokens_per_rank(cfg) -> float:
    q = cfg.quant
    if q.gptq_calib_batches > 0:
        return q.gptq_calib_batches * cfg.train.train_batch_tokens / cfg.train.grad_accum_base
    return q.gptq_calib_seqs * cfg.train.train_seq_len


def hessian_flops(cfg) -> float:
    """Forward + X^T X FLOPs of the GPTQ calibration on one rank (loops on, as the records)."""
    a, att, xtx = _forward_split(json.dumps(asdict(cfg.model), sort_keys=True), cfg.train.train_seq_len, cfg.model.num_loops > 0)
    return calib_tokens_per_rank(cfg) * (a + att + xtx)


def fit_hessian_constants(records: tuple[HessianRecord, ...] = HESSIAN_RECORDS) -> tuple[float, float]:
    """(fixed seconds, FLOP/s) of the Hessian collection, least squares on the relative error."""
    from scipy.optimize import nnls

    X = np.array([[1.0, hessian_flops(_load(r.preset))] for r in records])
    y = np.array([r.seconds for r in records])
    coef, _ = nnls(X / y[:, None], np.ones_like(y))
    assert coef[1] > 0, f"degenerate Hessian fit {coef}"
    return float(coef[0]), float(1.0 / coef[1])


#: ``fit_hessian_constants()`` frozen.
HESSIAN_FIXED_SECONDS, HESSIAN_FLOPS_PER_SECOND = 1.075010245248225, 191937888346022.38

#: Assumptions (no record logs these separately): the GPTQ solve is a sequential column loop of a
#: few small kernels per column (~100 us a column on an H100), and the compressors' throughput on
#: the record host, MB of quantised input (one byte a weight) per second. The codec rates are
#: ``measure_codec_rates()`` on this workbench's CPU scaled so that brotli-11 takes R6/R7's ~25 s
#: (R7's README: per-group lrzip, logged 98-102 s, costs ~75 s more than brotli).
GPTQ_SECONDS_PER_COLUMN = 1e-4
#: ``python -m pgolf.train.steptime --codecs`` (once; the measurement varies with this machine's load).
CODEC_MB_PER_SECOND = {"none": float("inf"), "zlib-9": 72.0, "zstd-22": 4.91, "lzma": 3.81, "brotli": 1.44}
BROTLI_ANCHOR_SECONDS, BROTLI_ANCHOR_PRESET = 25.0, "pr1855"


def measure_codec_rates(mb: int = 4) -> dict[str, float]:
    """Compression MB/s of each codec here on int6-like bytes, scaled to the record host by the
    brotli anchor (``BROTLI_ANCHOR_SECONDS`` for ``BROTLI_ANCHOR_PRESET``'s weights)."""
    import time

    from pgolf.quant.codecs import compress

    rng = np.random.default_rng(0)
    data = np.clip(np.round(rng.standard_normal(mb << 20) * 8), -31, 31).astype(np.int8).tobytes()
    here = {}
    for codec in ("zlib-9", "zstd-22", "lzma", "brotli"):
        t0 = time.perf_counter()
        compress(codec, data)
        here[codec] = len(data) / 1e6 / (time.perf_counter() - t0)
    anchor_mb = _matrix_shapes(json.dumps(asdict(_load(BROTLI_ANCHOR_PRESET).model), sort_keys=True))[2] / 1e6
    factor = (anchor_mb / BROTLI_ANCHOR_SECONDS) / here["brotli"]
    return {k: v * factor for k, v in here.items()}


def serialisation_seconds(cfg) -> dict:
    """Hessians (fitted), GPTQ solve and compression (assumed) seconds of the export."""
    shapes, _, n_all = _matrix_shapes(json.dumps(asdict(cfg.model), sort_keys=True))
    q = cfg.quant
    hess = HESSIAN_FIXED_SECONDS + hessian_flops(cfg) / HESSIAN_FLOPS_PER_SECOND if q.gptq == "full" else 0.0
    cols = sum(s[1] for s in shapes) + (cfg.model.model_dim if q.gptq_embed else 0)
    solve = cols * GPTQ_SECONDS_PER_COLUMN if q.gptq == "full" else 0.0
    codecs = [c for c in CODEC_MB_PER_SECOND if c != "none"] if q.codec == "auto" else [q.codec]
    compress = sum(n_all / 1e6 / CODEC_MB_PER_SECOND[c] for c in codecs)
    return {"gptq_hessian_seconds": hess, "gptq_solve_seconds": solve, "compress_seconds": compress,
            "total_seconds": hess + solve + compress}


# ------------------------------------------------------------------------------------------------
# A run


def schedule(ms_off: float, ms_on: float, train_seconds: float, *, loop_enable_at: float, has_loops: bool,
             iterations: int, capped: bool = True) -> tuple[int, int | None]:
    """(steps, step at which the loops switch on or None): loops off at ``ms_off`` until the
    training fraction reaches ``loop_enable_at``, then ``ms_on``; training stops after the step that
    reaches the cap (``capped``) or at ``iterations``."""
    if not has_loops:
        steps = math.ceil(1e3 * train_seconds / ms_off) if capped else iterations
        return min(steps, iterations), None
    if loop_enable_at <= 0:
        steps = math.ceil(1e3 * train_seconds / ms_on) if capped else iterations
        return min(steps, iterations), 0
    if not capped:
        on = math.ceil(loop_enable_at * iterations)
        return iterations, (on if on < iterations else None)
    on = math.ceil(1e3 * loop_enable_at * train_seconds / ms_off)  # the first step with frac >= f
    if on >= iterations:
        return iterations, None
    steps = on + math.ceil((1e3 * train_seconds - on * ms_off) / ms_on)
    return min(steps, iterations), on


def synthetic_doc_lengths(n_targets: int, n_docs: int = OFFICIAL_VAL_DOCS, sigma: float = 0.75, points: int = 2000) -> np.ndarray:
    """Document lengths for the phased-TTT estimate without data: log-normal quantiles with the
    official split's mean (targets / 50,000 documents) and the spread of log length measured on
    2,800 FineWeb documents (sigma 0.75 of log characters)."""
    from statistics import NormalDist

    z = np.array([NormalDist().inv_cdf((i + 0.5) / points) for i in range(points)])
    mu = math.log(n_targets / n_docs) - sigma * sigma / 2
    return np.maximum(1.0, np.round(np.exp(mu + sigma * z)))


def predict_run(cfg, constants: StepConstants = FITTED, train_seconds: float | None = None, with_eval: bool = True) -> dict:
    """The 8 x H100 plan of run config ``cfg``: ms per step (loops off / on), steps, the loop
    switch, serialisation and evaluation seconds."""
    m, t, q = cfg.model, cfg.train, cfg.quant
    has_loops = m.num_loops > 0
    f_off = step_features(cfg, looping=False)
    f_on = step_features(cfg, looping=True) if has_loops else f_off
    ms_off = 1e3 * step_seconds(f_off, constants)
    ms_on = 1e3 * step_seconds(f_on, constants)
    ser = serialisation_seconds(cfg)
    capped = t.max_wallclock_seconds > 0
    if train_seconds is None:
        reserve = 0.0
        if q.gptq == "full" and capped:
            from pgolf.quant.reserve import suggested_reserve

            reserve = suggested_reserve(ser["gptq_hessian_seconds"]) if q.gptq_reserve_seconds < 0 else q.gptq_reserve_seconds
        train_seconds = max(t.max_wallclock_seconds - reserve, 0.0)
    else:
        reserve = None
    steps, on = schedule(ms_off, ms_on, train_seconds, loop_enable_at=m.loop_enable_at, has_loops=has_loops,
                         iterations=t.iterations, capped=capped)
    if on is None:
        seconds = steps * ms_off / 1e3
    else:
        seconds = (on * ms_off + (steps - on) * ms_on) / 1e3
    out = {
        "ms_per_step_loops_off": ms_off,
        "ms_per_step_loops_on": ms_on if has_loops else None,
        "ms_per_step_mean": 1e3 * seconds / max(steps, 1),
        "train_seconds": seconds if not capped else train_seconds,
        "reserve_seconds": reserve,
        "steps": steps,
        "loop_on_step": on if has_loops else None,
        "tokens_per_second": t.train_batch_tokens * steps / max(seconds, 1e-9),
        "mfu_loops_off": (f_off.linear_flops + f_off.attention_flops / 2) / (ms_off / 1e3) / H100_BF16_DENSE_PEAK,
        "serialisation": ser,
        "constants": asdict(constants),
        "assumption": "8xH100 SXM; " + constants.describe() + "; compile warm-up outside the clock",
    }
    if with_eval:
        n_targets = official_val_targets(m.vocab_size, cfg.data.transform != "none")
        lengths = synthetic_doc_lengths(n_targets) if cfg.ttt.mode == "phased" else None
        est = estimate_8xh100(m, cfg.eval_seq_len, cfg.eval.sliding_stride, cfg.ttt, n_targets=n_targets,
                              doc_lengths=lengths, caseops=cfg.data.transform != "none")
        out["eval"] = est.as_dict()
    return out


def record_table(constants: StepConstants = FITTED) -> list[dict]:
    """Predicted vs logged ms/step and steps for every record (at the record's own train time)."""
    rows = []
    for rec in RECORDS:
        pred = predict_run(_load(rec.preset), constants, train_seconds=rec.train_seconds, with_eval=False)
        ms = 1e3 * rec.train_seconds / pred["steps"]
        rows.append({
            "record": rec.name, "preset": rec.preset,
            "logged_ms": rec.ms_per_step, "predicted_ms": ms, "ms_error": ms / rec.ms_per_step - 1.0,
            "logged_steps": rec.steps, "predicted_steps": pred["steps"], "steps_error": pred["steps"] / rec.steps - 1.0,
            "logged_loop_on_step": rec.loop_on_step, "predicted_loop_on_step": pred["loop_on_step"],
        })
    return rows


def format_record_table(rows: list[dict]) -> str:
    lines = ["| record | preset | logged ms/step | predicted | error | logged steps | predicted | error | loops on at (logged / predicted) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        loop = "" if r["logged_loop_on_step"] is None else f"{r['logged_loop_on_step']:,.0f} / {r['predicted_loop_on_step']:,}"
        lines.append(f"| {r['record']} | {r['preset']} | {r['logged_ms']:.2f} | {r['predicted_ms']:.2f} | {100 * r['ms_error']:+.1f}% | "
                     f"{r['logged_steps']:,.0f} | {r['predicted_steps']:,} | {100 * r['steps_error']:+.1f}% | {loop} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m pgolf.train.steptime", description="the 8xH100 step-time model's record table")
    p.add_argument("--refit", action="store_true", help="refit the constants on the records and print them")
    p.add_argument("--codecs", action="store_true", help="measure the codec rates here (scaled to the record host)")
    args = p.parse_args(argv)
    consts = FITTED
    if args.refit:
        consts = fit_constants()
        print(f"FITTED = {consts!r}")
        print(f"HESSIAN_FIXED_SECONDS, HESSIAN_FLOPS_PER_SECOND = {fit_hessian_constants()!r}")
    if args.codecs:
        print(f"CODEC_MB_PER_SECOND = {measure_codec_rates()!r}")
    print(consts.describe())
    print(format_record_table(record_table(consts)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
