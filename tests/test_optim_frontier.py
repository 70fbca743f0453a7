"""The later records' optimizer pieces (frontier.md §3.9-3.10), one defining property each:
NorMuon's lerp direction, MuonEq-R, Polar-Express NS, batched NS by shape, the sharded Muon step
and the grouped replicated-grad all-reduce (2 gloo processes), per-group Adam WD, the schedules.

Run as a script (``torchrun --nproc_per_node=2 tests/test_optim_frontier.py OUT``) this file is
the worker of the 2-process test: every rank feeds its own local grads to sharded Muon and saves
the parameters it ends with.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pgolf.config import load_config
from pgolf.errors import ConfigError
from pgolf.optim.groups import build_optimizers, matrix_optimizer, replicated_parameters, split_parameters
from pgolf.optim.muon import Muon, shape_banks
from pgolf.optim.newton_schulz import (
    POLAR_EXPRESS_COEFFS,
    newton_schulz5,
    polar_express,
    row_normalize,
    widened_bf16_matmul,
)
from pgolf.optim.normuon import NorMuon
from pgolf.optim.schedule import lr_scale_frac, muon_wd_multiplier, training_fraction
from pgolf.optim.sharded import all_reduce_replicated_grads

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------
# Independent references (written from the formulas, not calling pgolf)

NS5 = (3.4445, -4.7750, 2.0315)


def ref_ns5(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = NS5
    x = g.bfloat16()
    x = x / (x.norm() + 1e-7)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.T if tall else x


def ref_muon_step(params, grads, bufs, lr, mu, wd=0.0):
    """The baseline Muon on one process (per matrix, fp32 momentum, bf16 update times the shape
    factor, decoupled WD)."""
    for p, g, buf in zip(params, grads, bufs):
        buf.mul_(mu).add_(g)
        u = ref_ns5(g + mu * buf)
        u = (u * max(1.0, p.size(0) / p.size(1)) ** 0.5).to(p.dtype)
        p.mul_(1 - lr * wd)
        p.add_(u, alpha=-lr)


# ------------------------------------------------------------------------------------------------
# NorMuon


def test_normuon_direction_is_pr89_lerp_bit_for_bit():
    torch.manual_seed(3)
    beta, beta2, lr = 0.95, 0.95, 0.02
    w0 = torch.randn(48, 96)
    grads = [torch.randn(48, 96) for _ in range(3)]
    p = nn.Parameter(w0.clone())
    opt = NorMuon([p], lr=lr, momentum=beta, beta2=beta2)
    ref, m, v = w0.clone(), torch.zeros(48, 96), torch.zeros(48, 1)
    lerp_differs = False
    for g in grads:
        p.grad = g.clone()
        opt.step()
        m.lerp_(g, 1 - beta)
        direction = g.lerp(m, beta)
        lerp_differs |= not torch.equal(direction.bfloat16(), (g * (1 - beta) + beta * m).bfloat16())
        u = ref_ns5(direction).float()
        v.mul_(beta2).add_(u.square().mean(dim=-1, keepdim=True), alpha=1 - beta2)
        scaled = u / (v.sqrt() + 1e-10)
        u = scaled * (u.norm() / (scaled.norm() + 1e-10))
        ref.add_(u, alpha=-lr)  # shape factor 1 (wide matrix)
        assert torch.equal(p.detach(), ref)
    assert lerp_differs  # the data does tell the two formulas apart, so the test has teeth


# ------------------------------------------------------------------------------------------------
# MuonEq-R, Polar Express, batched NS


def test_row_normalize_gives_unit_rows_and_keeps_zero_rows():
    torch.manual_seed(0)
    u = torch.randn(2, 5, 7) * torch.tensor([1e-3, 0.5, 1.0, 30.0, 0.0])[:, None]
    out = row_normalize(u)
    norms = out.norm(dim=-1)
    assert torch.allclose(norms[:, :4], torch.ones(2, 4), atol=1e-6)
    assert torch.equal(out[:, 4], torch.zeros(2, 7))  # max(||row||, 1e-7) keeps a zero row at zero
    half = row_normalize(u.bfloat16())
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float().norm(dim=-1)[:, :4], torch.ones(2, 4), atol=1e-2)


def _conditioned(rows: int, cols: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen))
    return u @ torch.diag(torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k)) @ v.T


def test_polar_express_maps_singular_values_into_its_design_band():
    # The five tuples are the minimax quintics for normalised singular values in [1e-3, 1]; composed
    # in exact arithmetic they map that interval into [0.8589, 1.1411] (float64 scan). In bf16 the
    # measured extremes are 0.856 and 1.143 on these matrices; [0.83, 1.17] leaves ~0.025 for bf16
    # rounding (eps 2^-8 per op over 5 iterations) and still excludes the baseline quintic, whose
    # smallest singular value here is ~0.67-0.73.
    gen = torch.Generator().manual_seed(0)
    badly = _conditioned(64, 128, 100.0, gen)  # sigma_min / ||G||_F ~ 4e-3, inside the design interval
    assert torch.linalg.svdvals(badly).min() / badly.norm() > 1e-3
    for g in (torch.randn(64, 128, generator=gen), torch.randn(128, 64, generator=gen), badly):
        out = polar_express(g)
        assert out.dtype == torch.bfloat16 and out.shape == g.shape
        s = torch.linalg.svdvals(out.float())
        assert 0.83 <= s.min() and s.max() <= 1.17, (tuple(g.shape), s.min(), s.max())
    s_std = torch.linalg.svdvals(newton_schulz5(torch.randn(64, 128, generator=gen)).float())
    assert s_std.min() < 0.8  # the band is a property of the schedule, not of any 5-step NS


def test_polar_express_runs_at_most_five_tuples():
    g = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    assert len(POLAR_EXPRESS_COEFFS) == 5
    assert torch.equal(polar_express(g, steps=8), polar_express(g, steps=5))
    assert not torch.equal(polar_express(g, steps=2), polar_express(g, steps=5))


def test_widened_bf16_matmul_is_the_bf16_gemm():
    # fp32 accumulation and one rounding, like torch's bf16 GEMM: equal bit for bit at these sizes
    # (contiguous and transposed operands, 2-D and batched); it is bf16 and not the fp32 product.
    gen = torch.Generator().manual_seed(5)
    for m, k, n in ((24, 40, 24), (64, 256, 64)):
        p = torch.randn(3, m, k, generator=gen).bfloat16()
        q = torch.randn(3, n, k, generator=gen).bfloat16()
        out = widened_bf16_matmul(p, q.mT)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, p @ q.mT)
        assert torch.equal(widened_bf16_matmul(p[0], q[0].mT.contiguous()), p[0] @ q[0].mT.contiguous())
        assert not torch.equal(out.float(), p.float() @ q.float().mT)


@pytest.mark.parametrize("ns", [newton_schulz5, polar_express])
def test_batched_newton_schulz_equals_per_matrix(ns):
    # Exact on CPU: bmm computes each batch slice with the same kernel and summation order as mm,
    # and the per-matrix norm over the last two dims equals the 2-D full norm bit for bit. On CUDA
    # the batched and single GEMMs may pick different kernels, so equality there is only to bf16
    # rounding.
    gen = torch.Generator().manual_seed(2)
    for shape in ((5, 24, 40), (3, 40, 24)):
        g = torch.randn(*shape, generator=gen)
        batched = ns(g)
        assert batched.shape == g.shape
        for i in range(shape[0]):
            assert torch.equal(batched[i], ns(g[i]))


def test_default_muon_is_the_baseline_muon_bit_for_bit():
    """Round-robin layout, standard NS, fp32 momentum, batched by shape: the same parameters as
    the per-matrix baseline Muon written out in this file."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(16, 32), (32, 16), (16, 32), (8, 24), (16, 32)]
    init = [torch.randn(*s, generator=gen) for s in shapes]
    params = [nn.Parameter(w.clone()) for w in init]
    opt = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1)
    ref, bufs = [w.clone() for w in init], [torch.zeros_like(w) for w in init]
    for _ in range(3):
        grads = [torch.randn(*s, generator=gen) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref_muon_step(ref, grads, bufs, lr=0.05, mu=0.9, wd=0.1)
    for p, r in zip(params, ref):
        assert torch.equal(p.detach(), r)


def test_shape_banks_follow_the_records_bank_order():
    # per layer: c_q, c_k, c_v, attn.proj, mlp.fc, mlp.proj of a d=8 model with kv 4 and MLP 4x
    layer = [(8, 8), (4, 8), (4, 8), (8, 8), (32, 8), (8, 32)]
    params = [torch.empty(s) for _ in range(2) for s in layer]
    banks = shape_banks(params)
    assert [tuple(params[b[0]].shape) for b in banks] == [(32, 8), (8, 32), (8, 8), (4, 8)]  # mlp_up, mlp_down, qo, kv
    assert banks[2] == [0, 3, 6, 9]  # members in parameter order


def test_bf16_momentum_stays_bf16_after_a_state_dict_round_trip():
    p = nn.Parameter(torch.randn(8, 16))
    opt = Muon([p], lr=0.01, momentum=0.9, momentum_dtype=torch.bfloat16, ns="polar_express", row_normalize=True)
    p.grad = torch.randn(8, 16)
    opt.step()
    assert opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
    opt.load_state_dict(opt.state_dict())  # torch casts state to the parameter dtype (fp32) here
    opt.step()
    assert opt.state[p]["momentum_buffer"].dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# Sharded Muon and the replicated all-reduce: 2 gloo processes vs 1 process on the averaged grads

# 3 matrices of one shape, 2 tall ones of the same numel (shape factor sqrt 2), one odd shape;
# interleaved so the banks are not contiguous in the parameter list. On 2 ranks the first bank is
# padded 3 -> 4 and the odd one 1 -> 2, so rank 1 holds a padding slot and an all-padding shard.
SHAPES = [(16, 32), (32, 16), (16, 32), (8, 24), (32, 16), (16, 32)]
STEPS, LR, MU, WORLD = 3, 0.05, 0.9, 2
CONFIGS = {
    "plain": {},
    "records": dict(ns="polar_express", row_normalize=True, momentum_dtype=torch.bfloat16, weight_decay=0.2),
}


def _init_params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(10)
    return [torch.randn(*s, generator=gen) * 0.5 for s in SHAPES]


def _local_grads(step: int, rank: int, dyadic: bool) -> list[torch.Tensor]:
    """Rank ``rank``'s local grads at ``step``. Dyadic grads are k/64 with |k| <= 60: exact in bf16,
    and so are the sum over 2 ranks and its half, so the reduce-scatter rounds nothing."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    if dyadic:
        return [torch.randint(-60, 61, s, generator=gen).float() / 64 for s in SHAPES]
    return [torch.randn(*s, generator=gen) for s in SHAPES]


def _run_sharded(config: dict, dyadic: bool, rank: int | None) -> list[torch.Tensor]:
    """Sharded Muon for STEPS steps: with ``rank`` (inside a process group) on that rank's local
    grads; with ``rank=None`` on one process with the grads averaged over WORLD ranks."""
    params = [nn.Parameter(w) for w in _init_params()]
    opt = Muon(params, lr=LR, momentum=MU, layout="sharded", **config)
    for step in range(STEPS):
        if rank is None:
            per_rank = [_local_grads(step, r, dyadic) for r in range(WORLD)]
            grads = [sum(gs) / WORLD for gs in zip(*per_rank)]
        else:
            grads = _local_grads(step, rank, dyadic)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


def _replicated_params() -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(20)
    shapes_dtypes = [((), torch.float32), ((7,), torch.float32), ((4, 4), torch.float32), ((3,), torch.bfloat16),
                     ((40000,), torch.float32), ((5,), torch.float32)]
    return [nn.Parameter(torch.randn(s, generator=gen).to(dt)) for s, dt in shapes_dtypes]


def _replicated_grads(rank: int) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(30)
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) / 4 + rank for p in _replicated_params()]
    grads[-1] = None  # a parameter without a grad is skipped
    return grads


def _worker(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == WORLD
    result = {(name, dyadic): _run_sharded(cfg, dyadic, rank) for name, cfg in CONFIGS.items() for dyadic in (True, False)}
    params = _replicated_params()
    for p, g in zip(params, _replicated_grads(rank)):
        p.grad = g
    calls, original = [], dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append((tensor.numel(), str(tensor.dtype)))
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    all_reduce_replicated_grads(params)
    dist.all_reduce = original
    result["replicated"] = [p.grad for p in params]
    result["calls"] = calls
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()  # gloo can abort at exit when a peer tears the group down first
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                          str(Path(__file__)), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_sharded_muon_on_two_ranks_equals_one_process_on_the_averaged_grads(two_ranks, config):
    # Dyadic grads: bit-exact. The reduce-scatter sums bf16 copies of the local grads and halves
    # them; with these grads nothing rounds, so the shard a rank orthogonalises is exactly the
    # bf16 cast of the averaged grad the one-process run sees, and batched NS is exact on CPU.
    one = _run_sharded(CONFIGS[config], True, None)
    for rank in range(WORLD):
        for a, b in zip(two_ranks[rank][(config, True)], one):
            assert torch.equal(a, b)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_sharded_muon_with_gaussian_grads_matches_to_bf16_rounding(two_ranks, config):
    # Gaussian grads: bf16(g0) + bf16(g1), rounded in bf16, differs from the one-process bf16 cast
    # of (g0 + g1) / 2 by about one bf16 ulp in some entries, and NS (most of all Polar Express,
    # whose first step has slope ~8) carries that into the update. Measured after STEPS steps: max
    # |diff| 0.0025 (plain) and 0.0052 (records) on entries of size ~0.5; a rank that skipped the
    # averaging (its local grads only) is off by 0.046-0.085. 1e-2 separates the two. Both ranks
    # agree exactly: they apply the same all-gathered updates.
    one = _run_sharded(CONFIGS[config], False, None)
    r0, r1 = two_ranks[0][(config, False)], two_ranks[1][(config, False)]
    for a, b, c in zip(r0, r1, one):
        assert torch.equal(a, b)
        assert torch.allclose(a, c, rtol=0, atol=1e-2)


def test_sharded_one_process_matches_round_robin_on_bf16_exact_grads():
    # Same averaged grads, exact in bf16: round-robin (fp32 grads) and sharded (bf16 grads) agree
    # bit for bit on the wide matrices (shape factor 1); the tall ones (factor sqrt 2) differ only
    # in where the factor is applied (round-robin rounds s*u to bf16 first, as the baseline).
    sharded = _run_sharded({}, True, None)
    params = [nn.Parameter(w) for w in _init_params()]
    opt = Muon(params, lr=LR, momentum=MU)
    for step in range(STEPS):
        grads = [sum(gs) / WORLD for gs in zip(*[_local_grads(step, r, True) for r in range(WORLD)])]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    for shape, a, b in zip(SHAPES, sharded, params):
        if shape[0] <= shape[1]:
            assert torch.equal(a, b.detach())
        else:
            assert torch.allclose(a, b.detach(), rtol=0, atol=1e-3)


def test_replicated_grads_are_averaged_with_one_call_per_device_dtype(two_ranks):
    expected = [None if g is None else (g + _replicated_grads(1)[i]) / 2 for i, g in enumerate(_replicated_grads(0))]
    for rank in range(WORLD):
        got = two_ranks[rank]["replicated"]
        for g, e in zip(got, expected):
            assert (g is None and e is None) or torch.equal(g, e)
        # the large grad on its own (launched first, async), then one flat fp32 pack (0-D + 7 + 16
        # elements) and one bf16 pack
        assert two_ranks[rank]["calls"] == [(40000, "torch.float32"), (24, "torch.float32"), (3, "torch.bfloat16")]


def test_replicated_all_reduce_is_a_no_op_without_a_process_group():
    params = _replicated_params()
    for p, g in zip(params, _replicated_grads(1)):
        p.grad = g
    all_reduce_replicated_grads(params)
    assert all(p.grad is None if g is None else torch.equal(p.grad, g) for p, g in zip(params, _replicated_grads(1)))


# ------------------------------------------------------------------------------------------------
# Per-group weight decay


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8, bias=False)
        self.attn_scale = nn.Parameter(torch.ones(8))
        self.gain = nn.Parameter(torch.tensor(1.5))  # 0-D


def test_group_weight_decays_and_their_fallback():
    model = _Tiny()
    cfg = load_config("baseline", None, [("optim.adam_wd", 0.04), ("optim.embed_wd", 0.085), ("optim.scalar_wd", 0.02),
                                         ("optim.muon_wd", 0.095)]).optim
    opts = build_optimizers(model, cfg, tied_embeddings=True)
    token, muon, scalar = opts[0], matrix_optimizer(opts), opts[-1]
    assert token.param_groups[0]["weight_decay"] == 0.085 and scalar.param_groups[0]["weight_decay"] == 0.02
    assert muon.param_groups[0]["weight_decay"] == muon.param_groups[0]["base_weight_decay"] == 0.095
    assert {id(p) for p in replicated_parameters(opts)} == {id(model.tok_emb.weight), id(model.attn_scale), id(model.gain)}
    fallback = build_optimizers(model, load_config("baseline", None, [("optim.adam_wd", 0.04)]).optim, True)
    assert fallback[0].param_groups[0]["weight_decay"] == fallback[-1].param_groups[0]["weight_decay"] == 0.04
    # the 0-D and 1-D scalars decay like any AdamW tensor: zero grads leave only p * (1 - lr * wd)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scalar.step()
    lr = scalar.param_groups[0]["lr"]
    assert split_parameters(model).names()["scalar"] == ["attn_scale", "gain"]
    for name in ("attn_scale", "gain"):
        assert torch.allclose(getattr(model, name).detach(), before[name] * (1 - lr * 0.02))


# ------------------------------------------------------------------------------------------------
# Schedules


def test_fraction_warmdown_closed_form():
    wf, floor = 0.75, 0.1  # R6: decay from frac 0.25, floor 0.1 from frac 1 - 0.1 * 0.75 = 0.925
    assert lr_scale_frac(0.2, wf, floor) == 1.0
    assert lr_scale_frac(0.25, wf, floor) == pytest.approx(1.0)
    assert lr_scale_frac(0.625, wf, floor) == pytest.approx(0.5)  # (1 - 0.625) / 0.75
    assert lr_scale_frac(0.85, wf, floor) == pytest.approx(0.2)
    assert lr_scale_frac(0.925, wf, floor) == pytest.approx(0.1)
    assert lr_scale_frac(0.99, wf, floor) == 0.1 and lr_scale_frac(1.2, wf, floor) == 0.1
    assert lr_scale_frac(0.99, 0.667, 0.0) == pytest.approx(0.01 / 0.667)  # R3: no floor
    assert lr_scale_frac(0.999, 0.0, 0.0) == 1.0  # warmdown off
    assert training_fraction(100, 300_000.0, iterations=1000, max_wallclock_ms=599_500.0) == pytest.approx(300 / 599.5)
    assert training_fraction(100, 300_000.0, iterations=1000, max_wallclock_ms=None) == 0.1
    assert training_fraction(100, 300_000.0, iterations=1000, max_wallclock_ms=0.0) == 0.1


def test_muon_wd_taper_closed_form():
    assert muon_wd_multiplier(0.5, 0.7, 0.5) == 1.0 and muon_wd_multiplier(0.7, 0.7, 0.5) == 1.0
    assert muon_wd_multiplier(0.85, 0.7, 0.5) == pytest.approx(0.75)
    assert muon_wd_multiplier(1.0, 0.7, 0.5) == pytest.approx(0.5) and muon_wd_multiplier(1.1, 0.7, 0.5) == pytest.approx(0.5)
    assert muon_wd_multiplier(0.99, 1.0, 0.5) == 1.0 and muon_wd_multiplier(0.99, 0.7, 1.0) == 1.0  # off


# ------------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("optim.muon_ns", "cubic", "optim.muon_ns: must be one of standard, polar_express"),
        ("optim.muon_layout", "zero3", "optim.muon_layout: must be one of round_robin, sharded"),
        ("optim.muon_momentum_dtype", "fp16", "optim.muon_momentum_dtype: must be one of fp32, bf16"),
        ("optim.embed_wd", -0.5, "optim.embed_wd: must be >= 0, or -1"),
        ("optim.scalar_wd", -2.0, "optim.scalar_wd: must be >= 0, or -1"),
        ("optim.muon_wd_taper_start", -0.1, "optim.muon_wd_taper_start"),
        ("optim.muon_wd_taper_final", -1.0, "optim.muon_wd_taper_final"),
    ],
)
def test_new_optim_keys_are_validated(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config("baseline", None, [(key, value)])


def test_muon_only_options_are_rejected_with_normuon():
    with pytest.raises(ConfigError, match="optim.muon_layout: must stay 'round_robin' with optim.matrix_optimizer=normuon"):
        load_config("baseline", None, [("optim.matrix_optimizer", "normuon"), ("optim.muon_layout", "sharded")])


def test_config_options_reach_the_muon_optimizer():
    cfg = load_config("baseline", None, [("optim.muon_row_normalize", True), ("optim.muon_ns", "polar_express"),
                                         ("optim.muon_layout", "sharded"), ("optim.muon_momentum_dtype", "bf16")]).optim
    muon = matrix_optimizer(build_optimizers(_Tiny(), cfg, True))
    group = muon.param_groups[0]
    assert (group["ns"], group["row_normalize"], muon.layout, muon.momentum_dtype) == ("polar_express", True, "sharded", torch.bfloat16)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
