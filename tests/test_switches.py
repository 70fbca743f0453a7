"""The experiment switches of issue 16: each one's defining property, and one tiny run through
all of them at once (README "Experiment switches (off in every preset)")."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pgolf.config import RunConfig, load_config
from pgolf.errors import ConfigError
from pgolf.model.config import SWIGLU_MULTIPLE, ModelConfig
from pgolf.model.gpt import GPT, count_parameters
from pgolf.optim.config import OptimConfig
from pgolf.quant.config import QuantConfig
from pgolf.train.config import TrainConfig

TINY = dict(vocab_size=64, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2)
FLOAT_QUANT = dict(embed_format="fp32", attn_format="fp32", mlp_format="fp32", other_format="fp32", small_format="fp32")


def _model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**TINY, **kw})).double()


def _ids(b: int = 2, t: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed))


def _randomise(model: torch.nn.Module, seed: int = 3) -> None:
    """Non-zero weights everywhere (zero-init projections would hide most of the forward)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)


# ---------------------------------------------------------------------------------------------
# 1. multi-token prediction heads


def test_mtp_heads_change_the_training_loss_by_their_formula():
    plain, mtp = _model(), _model(mtp_heads=2, mtp_weight=0.3)
    _randomise(mtp)
    trunk = {k: v for k, v in mtp.state_dict().items() if not k.startswith("mtp_heads.")}
    plain.load_state_dict(trunk, strict=True)
    ids = _ids()
    x, y = ids[:, :-1], ids[:, 1:]
    main = plain(x, y)
    hidden = mtp.forward_hidden(x)
    extra = []
    for k, head in enumerate(mtp.mtp_heads):
        logits = 30.0 * torch.tanh(F.linear(hidden[:, : x.size(1) - 1 - k], head.weight) / 30.0)
        extra.append(F.cross_entropy(logits.reshape(-1, 64), y[:, 1 + k :].reshape(-1)))
    expected = main + 0.3 * (extra[0] + extra[1]) / 2
    assert not torch.allclose(mtp(x, y), main)
    torch.testing.assert_close(mtp(x, y), expected, rtol=1e-12, atol=1e-12)
    # evaluation never reads the heads: token_nll is the plain model's, exactly
    assert torch.equal(mtp.token_nll(x, y), plain.token_nll(x, y))


def test_mtp_heads_leave_the_trunk_init_and_the_parameter_total_unchanged():
    plain, mtp = _model(), _model(mtp_heads=3)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, mtp.state_dict()[k]), k
    counts = count_parameters(mtp)
    assert counts["total"] == count_parameters(plain)["total"]
    assert counts["mtp_heads"] == 3 * 64 * 64


def test_mtp_heads_are_not_in_the_artifact_and_its_score_is_the_trained_models(tmp_path):
    from pgolf.quant.artifact import build_artifact, load_artifact_model, load_artifact_state

    mtp = _model(mtp_heads=2).float()
    _randomise(mtp)
    cfg = mtp.cfg
    report, qts = build_artifact(mtp.state_dict(), cfg, QuantConfig(**FLOAT_QUANT), tmp_path / "a.pgolf", code_bytes=0)
    meta, state = load_artifact_state(tmp_path / "a.pgolf")
    assert not [k for k in state if "mtp" in k] and not [q.name for q in qts if "mtp" in q.name]
    assert meta["model"]["mtp_heads"] == 0
    fresh, _ = load_artifact_model(tmp_path / "a.pgolf")
    assert not hasattr(fresh.mtp_heads, "weight") and count_parameters(fresh)["total"] == count_parameters(mtp)["total"]
    ids = _ids()
    assert torch.equal(fresh.token_nll(ids[:, :-1], ids[:, 1:]), mtp.token_nll(ids[:, :-1], ids[:, 1:]))


# ---------------------------------------------------------------------------------------------
# 2. MLP variants


@pytest.mark.parametrize("dim,mult", [(64, 2.0), (512, 2.0), (512, 3.0), (512, 4.0), (384, 2.5)])
def test_swiglu_has_the_relu2_parameter_count_within_the_rounding(dim, mult):
    cfg = ModelConfig(model_dim=dim, mlp_mult=mult, num_heads=4, num_kv_heads=2, mlp_kind="swiglu")
    h, hs = cfg.mlp_hidden, cfg.swiglu_hidden
    assert hs % SWIGLU_MULTIPLE == 0
    assert abs(3 * dim * hs - 2 * dim * h) <= 3 * dim * SWIGLU_MULTIPLE / 2  # the nearest multiple: half a step per matrix
    block = GPT(ModelConfig(**{**TINY, "model_dim": dim, "mlp_mult": mult, "mlp_kind": "swiglu", "num_layers": 1})).blocks[0].mlp
    assert sum(p.numel() for p in block.parameters()) == 3 * dim * hs
    if (dim, mult) == (512, 3.0):
        assert hs == 1024  # exactly equal at the records' 3x MLP


def test_swiglu_and_star_relu_forward_formulas():
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    sw = _model(mlp_kind="swiglu")
    _randomise(sw)
    m = sw.blocks[1].mlp
    torch.testing.assert_close(m(x), F.linear(F.silu(F.linear(x, m.gate.weight)) * F.linear(x, m.fc.weight), m.proj.weight))
    star = _model(mlp_kind="star_relu")
    relu2 = _model()
    assert star.blocks[1].mlp.star_scale.item() == 1.0 and star.blocks[1].mlp.star_bias.item() == 0.0
    _randomise(star)
    m, r = star.blocks[1].mlp, relu2.blocks[1].mlp
    with torch.no_grad():
        m.star_scale.fill_(1.0)  # the init values
        m.star_bias.fill_(0.0)
    r.fc.weight.data.copy_(m.fc.weight)
    r.proj.weight.data.copy_(m.proj.weight)
    torch.testing.assert_close(m(x), r(x))  # at init (s = 1, b = 0): the relu^2 MLP
    with torch.no_grad():
        m.star_scale.fill_(0.7)
        m.star_bias.fill_(-0.2)
    torch.testing.assert_close(m(x), F.linear(0.7 * torch.relu(F.linear(x, m.fc.weight)).square() - 0.2, m.proj.weight))
    with pytest.raises(ConfigError, match="model.mlp_kind"):
        ModelConfig(mlp_kind="swiglu", mlp_activation="leaky_relu2").validate()


# ---------------------------------------------------------------------------------------------
# 3. value residual learning


def _record_values(model: GPT) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    for block in model.blocks:
        mix = block.attn.value_mix
        block.attn.value_mix = lambda attn, v, mix=mix: seen.append((v, mix(attn, v))) or seen[-1][1]
    return seen


def test_value_residual_mixes_exactly_the_first_blocks_values():
    model = _model(value_residual=True)
    _randomise(model)
    with torch.no_grad():
        for i, block in enumerate(model.blocks[1:], start=1):
            block.attn.vr_lambda.copy_(torch.tensor([0.3 * i, 1.0 - 0.2 * i]))
    seen = _record_values(model)
    model.token_nll(_ids(), _ids(seed=2))
    v_first = seen[0][1]
    assert torch.equal(seen[0][0], v_first)  # block 0 is unchanged
    for i, (raw, mixed) in enumerate(seen[1:], start=1):
        lam = model.blocks[i].attn.vr_lambda
        assert torch.equal(mixed, lam[0] * raw + lam[1] * v_first)


def test_value_residual_at_init_is_the_half_half_mix_and_lambda_1_0_is_off():
    model = _model(value_residual=True)
    for block in model.blocks[1:]:
        assert block.attn.vr_lambda.tolist() == [0.5, 0.5]
    _randomise(model)
    with torch.no_grad():
        for block in model.blocks[1:]:
            block.attn.vr_lambda.copy_(torch.tensor([0.5, 0.5]))
    seen = _record_values(model)
    model.token_nll(_ids(), _ids(seed=2))
    for raw, mixed in seen[1:]:
        assert torch.equal(mixed, 0.5 * raw + 0.5 * seen[0][1])
    plain = _model()
    with torch.no_grad():
        for block in model.blocks[1:]:
            block.attn.vr_lambda.copy_(torch.tensor([1.0, 0.0]))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "vr_lambda" not in k}, strict=True)
    assert torch.equal(plain.token_nll(_ids(), _ids(seed=2)), model.token_nll(_ids(), _ids(seed=2)))
    with pytest.raises(ConfigError, match="model.value_residual"):
        ModelConfig(**TINY, value_residual=True, num_loops=1, loop_start=0, loop_end=1).validate()


# ---------------------------------------------------------------------------------------------
# 4. sequence-length curriculum and batch warm-up


def test_curriculum_seq_len_and_batch_at_step_k_in_closed_form():
    from pgolf.train.curriculum import Curriculum

    t = TrainConfig(train_batch_tokens=8192, train_seq_len=64, iterations=100, seq_len_schedule="16:0,32:0.25,64:0.5",
                    batch_warmup_tokens=2048, batch_warmup_steps=10)
    t.validate()
    c = Curriculum(t, world_size=2, accum=4)
    for k in range(0, 100, 7):
        frac = k / 100
        length = 16 if frac < 0.25 else 32 if frac < 0.5 else 64
        q = 8192 // 8
        batch = 8192 if k >= 10 else max(q, int((2048 + 6144 * k / 10) // q) * q)
        assert c.at(k, frac) == (batch, length)
    assert c.at(3, 0.03) == (3072, 16)  # 2048 + 6144 * 0.3 = 3891.2 -> 3 * 1024
    assert c.batch_sizes() == [2048, 3072, 4096, 5120, 6144, 7168, 8192]
    assert len(c.shapes()) == 3 * 7
    off = Curriculum(TrainConfig(train_batch_tokens=8192, train_seq_len=64))
    assert not off.active and off.at(0, 0.0) == off.at(10**6, 0.99) == (8192, 64)


def test_curriculum_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.seq_len_schedule"):
        TrainConfig(train_seq_len=64, seq_len_schedule="16:0,32:0.5").validate()  # last length != train_seq_len
    with pytest.raises(ConfigError, match="train.seq_len_schedule"):
        TrainConfig(train_seq_len=64, seq_len_schedule="16:0.1,64:0.5").validate()  # does not start at 0
    with pytest.raises(ConfigError, match="train.batch_warmup"):
        TrainConfig(batch_warmup_tokens=1024).validate()
    cfg = RunConfig()
    cfg.train.seq_len_schedule = "256:0,1024:0.5"
    cfg.data.loader = "shuffled"
    with pytest.raises(ConfigError, match="data.loader=stream"):
        cfg.validate()


# ---------------------------------------------------------------------------------------------
# 5. D2Z and 6. the decoder LR multiplier


def test_d2z_is_linear_decay_to_zero_over_the_run():
    from pgolf.optim.schedule import lr_scale_d2z
    from pgolf.train.loop import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.cfg = RunConfig()
    trainer.cfg.train.lr_schedule, trainer.cfg.train.iterations = "d2z", 200
    for k in (0, 1, 50, 199, 200):
        assert trainer.schedule(k, 0.0, None) == (k / 200, 1 - k / 200)
    assert trainer.schedule(30, 150_000.0, 600_000.0) == (0.25, 0.75)  # wallclock fraction
    assert lr_scale_d2z(1.2) == 0.0


@pytest.mark.parametrize("loops", [False, True])
def test_decoder_lr_multiplier_scales_exactly_the_decoder_only_blocks(loops):
    from pgolf.optim.groups import build_optimizers, matrix_optimizer, split_parameters

    kw = dict(num_layers=6, num_loops=1, loop_start=1, loop_end=2) if loops else {}
    model = _model(**kw).float()
    decoder = {3, 4, 5}  # with loops the virtual list is 0,1,2,1 | 2,3,4,5: blocks 1, 2 run in both halves
    assert model.cfg.decoder_only_blocks() == sorted(decoder if loops else {2, 3})
    opt = matrix_optimizer(build_optimizers(model, OptimConfig(matrix_lr=0.04, decoder_lr_mult=2.5), tied_embeddings=True))
    lr_of = {id(p): g["base_lr"] for g in opt.param_groups for p in g["params"]}
    names = split_parameters(model).matrix
    assert names
    for name, p in names:
        in_decoder = int(name.split(".")[1]) in model.cfg.decoder_only_blocks() if name.startswith("blocks.") else False
        assert lr_of[id(p)] == pytest.approx(0.1 if in_decoder else 0.04), name
    plain = matrix_optimizer(build_optimizers(model, OptimConfig(matrix_lr=0.04), tied_embeddings=True))
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["base_lr"] == 0.04


# ---------------------------------------------------------------------------------------------
# 7. temperature at evaluation


def test_temperature_one_is_bit_identical_and_t_is_the_closed_form():
    model = _model()
    _randomise(model)
    ids, tg = _ids(), _ids(seed=2)
    base = model.token_nll(ids, tg)
    model.set_eval_temperature(1.0)
    assert torch.equal(model.token_nll(ids, tg, 3), model.token_nll(ids, tg)[:, 3:])
    assert torch.equal(model.token_nll(ids, tg), base)
    z = model.logits(model.forward_hidden(ids))  # the soft-capped logits
    for t in (0.7, 1.3):
        model.set_eval_temperature(t)
        expected = torch.logsumexp(z / t, dim=-1) - z.gather(-1, tg[..., None])[..., 0] / t
        torch.testing.assert_close(model.token_nll(ids, tg), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model.token_nll(ids, tg, 5), expected[:, 5:], rtol=1e-12, atol=1e-12)  # sliding windows
        assert torch.equal(copy.deepcopy(model).token_nll(ids, tg), model.token_nll(ids, tg))  # TTT's copy keeps it
        assert torch.equal(model(ids, tg), F.cross_entropy(z.reshape(-1, 64), tg.reshape(-1)))  # training never divides
    with pytest.raises(ConfigError, match="eval.temperature"):
        load_config("baseline", None, [("eval.temperature", 0.0)])


def test_temperature_reaches_the_standard_and_sliding_evaluations():
    from pgolf.eval.sliding import evaluate_sliding
    from pgolf.eval.standard import evaluate_standard

    from pgolf.eval.bpb import ByteLUT

    v = TINY["vocab_size"]
    lut = ByteLUT(torch.ones(v, dtype=torch.int16), torch.zeros(v, dtype=torch.bool), torch.zeros(v, dtype=torch.bool))
    model = _model().float()
    _randomise(model)
    tokens = _ids(1, 129, seed=5)[0]
    nll = {}
    for t in (1.0, 2.0):
        model.set_eval_temperature(t)
        std = evaluate_standard(model.token_nll, tokens, 32, lut, batch_tokens=64, device="cpu")
        sl = evaluate_sliding(model.token_nll, tokens, 32, 16, lut, batch_windows=4)
        nll[t] = (std.val_loss, sl.val_loss)
    assert nll[1.0][0] != nll[2.0][0] and nll[1.0][1] != nll[2.0][1]


# ---------------------------------------------------------------------------------------------
# 8. KURE and R2 penalties


def test_kure_and_r2_values_and_gradients():
    from pgolf.quant.penalties import kure_penalty, kurtosis, r2_penalty

    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    for w in mats:
        x = w.detach().reshape(-1)
        mu, s = x.mean(), x.std(unbiased=False)
        assert kurtosis(w).item() == pytest.approx((((x - mu) / s) ** 4).mean().item(), rel=1e-12)
    expected_kure = sum((kurtosis(w) - 1.8) ** 2 for w in mats) / 2
    expected_r2 = sum(w.detach().abs().max(dim=1).values.mean() for w in mats) / 2
    assert kure_penalty(mats).item() == pytest.approx(expected_kure.item(), rel=1e-12)
    assert r2_penalty(mats).item() == pytest.approx(expected_r2.item(), rel=1e-12)
    # autograd's gradients equal finite differences (float64; random weights have no ties in the row max)
    assert torch.autograd.gradcheck(lambda a, b: kure_penalty([a, b]), tuple(mats))
    assert torch.autograd.gradcheck(lambda a, b: r2_penalty([a, b]), tuple(mats))
    # R2's gradient: sign(w) / (rows * matrices) at each row's max, zero elsewhere
    w = mats[0]
    (grad,) = torch.autograd.grad(r2_penalty([w]), w)
    at_max = torch.zeros_like(w).scatter_(1, w.detach().abs().argmax(1, keepdim=True), 1.0)
    assert torch.equal(grad, at_max * torch.sign(w.detach()) / w.shape[0])


def test_penalties_read_the_block_matrices_and_are_off_at_zero_weight():
    from pgolf.quant.penalties import block_matrices, build_weight_penalty, kure_penalty, r2_penalty

    model = _model(mtp_heads=1, bigram_buckets=8, bigram_dim=16, ve_layers=[-1], ve_dim=16, skip_gates=True, attn_out_gate="attn_out")
    names = [n for n, _ in block_matrices(model)]
    assert "blocks.0.attn.c_q.weight" in names and "bigram.proj.weight" in names and "ve_shared.proj.weight" in names
    assert not [n for n in names if "emb" in n or "mtp" in n or "gate" in n or "skip" in n]
    assert build_weight_penalty(QuantConfig(), model) is None
    fn = build_weight_penalty(QuantConfig(kure_weight=0.5, r2_weight=2.0), model)
    mats = [p for _, p in block_matrices(model)]
    torch.testing.assert_close(fn(), 0.5 * kure_penalty(mats) + 2.0 * r2_penalty(mats))


# ---------------------------------------------------------------------------------------------
# 9. tanh weight reparameterisation


def test_tanh_reparam_bounds_the_effective_weight_and_exports_it():
    from pgolf.model.export_view import TanhReparam, artifact_view, is_block_matrix

    a = 0.05
    w = torch.randn(256, 256, dtype=torch.float64) * 3
    eff = TanhReparam(a)(w)
    assert eff.abs().max() <= a and torch.allclose(TanhReparam(a)(w * 1e-6), w * 1e-6, rtol=1e-9)
    model = _model(tanh_reparam=a, bigram_buckets=8, bigram_dim=16, ve_layers=[-1], ve_dim=16, attn_out_gate="attn_out")
    _randomise(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0)
    transformed = {f"{n}.weight" for n, m in model.named_modules() if isinstance(getattr(m, "weight_transform", None), TanhReparam)}
    assert transformed == {k for k, v in model.state_dict().items() if v.ndim == 2 and is_block_matrix(k)}
    for name, module in model.named_modules():
        if name + ".weight" in transformed:
            assert module.weight_transform(module.weight).abs().max() <= a
    state, cfg = artifact_view(model.state_dict(), model.cfg)
    assert cfg.tanh_reparam == 0 and cfg.mtp_heads == 0
    plain = GPT(cfg).double()
    plain.load_state_dict(state, strict=True)
    ids, tg = _ids(), _ids(seed=2)
    torch.testing.assert_close(plain.token_nll(ids, tg), model.token_nll(ids, tg), rtol=1e-12, atol=1e-12)
    with pytest.raises(ConfigError, match="model.tanh_reparam"):
        load_config("baseline", None, [("model.tanh_reparam", 0.1), ("quant.qat", "always")])


# ---------------------------------------------------------------------------------------------
# 12. SAM during test-time training


def test_sam_step_takes_its_gradient_at_the_perturbed_weights():
    from pgolf.eval.ttt import sam_gradients, sgd_pass

    model = _model()
    _randomise(model)
    params = list(model.parameters())
    ids = _ids(4, 17, seed=7)
    x, y = ids[:, :-1], ids[:, 1:]

    def loss() -> torch.Tensor:
        return model.token_nll(x, y, 0).sum() / y.numel()

    rho = 0.05
    w0 = [p.detach().clone() for p in params]
    g = torch.autograd.grad(loss(), params)
    norm = torch.sqrt(sum(gi.square().sum() for gi in g))
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(rho * gi / norm)
    expected = torch.autograd.grad(loss(), params)
    with torch.no_grad():
        for p, w in zip(params, w0):
            p.copy_(w)
    sam_gradients(params, lambda: loss().backward(), rho, 1)
    for p, w, e in zip(params, w0, expected):
        assert torch.equal(p.detach(), w)  # weights restored exactly
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)
    assert not all(torch.allclose(e, gi) for e, gi in zip(expected, g))  # not the plain gradient
    # one SGD step of the TTT pass (no momentum, no clip) moves by exactly -lr * that gradient
    for p in params:
        p.grad = None
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.0)
    sgd_pass(model, params, opt, x, y, lr=0.1, epochs=1, batch_seqs=4, grad_clip=0.0, rank=0, world_size=1,
             device=torch.device("cpu"), autocast_dtype=None, sam_rho=rho)
    for p, w, e in zip(params, w0, expected):
        torch.testing.assert_close(p.detach(), w - 0.1 * e, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="ttt.sam_rho"):
        load_config("baseline", None, [("ttt.sam_rho", -1.0)])


# ---------------------------------------------------------------------------------------------
# 11. parallel EMA tracks with proxy selection on held-out training tokens


def _avg(model, **kw):
    from pgolf.train.averaging import WeightAverager
    from pgolf.train.config import AveragingConfig

    cfg = AveragingConfig(**{"export": "ema", **kw})
    cfg.validate()
    return WeightAverager(cfg, model)


def test_ema_tracks_equal_independent_emas_by_hand():
    model = _model().float()
    decays = [0.5, 0.9, 0.99]
    avg = _avg(model, ema_decay=0.7, ema_tracks=decays)
    by_hand = [{k: v.detach().double().clone() for k, v in model.state_dict().items() if v.is_floating_point()} for _ in decays]
    g = torch.Generator().manual_seed(5)
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        avg.after_step(model, step, 1.0)
        live = model.state_dict()
        for d, shadow in zip(decays, by_hand):
            for k in shadow:
                shadow[k] = d * shadow[k] + (1 - d) * live[k].double()
    assert [t.decay for t in avg.tracks] == decays and all(t is not avg.ema for t in avg.tracks)
    for track, shadow in zip(avg.tracks, by_hand):
        for k, v in shadow.items():
            torch.testing.assert_close(track.shadow[k].double(), v, rtol=1e-5, atol=1e-6)


def test_ema_tracks_export_the_lowest_proxy_loss():
    model = _model().float()
    avg = _avg(model, ema_decay=0.7, ema_tracks=[0.5, 0.9])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    avg.after_step(model, 1, 1.0)
    losses = {id(avg.ema.shadow): 3.0, id(avg.tracks[0].shadow): 2.5, id(avg.tracks[1].shadow): 1.5}
    lines = avg.select_track(lambda shadow: losses[id(shadow)])
    assert avg.selected is avg.tracks[1]
    assert lines[-1].startswith("ema_tracks: chose track1 decay=0.9") and len(lines) == 4
    assert all(line.startswith("ema_tracks:") for line in lines)
    state, msg = avg.export_state(model)
    for k, v in avg.tracks[1].shadow.items():
        assert torch.equal(state[k], v.to(state[k].dtype))
    assert "decay=0.9" in msg
    with pytest.raises(RuntimeError, match="select_track"):
        _avg(model, ema_tracks=[0.5]).export_state(model)


def test_ema_tracks_config_and_profile_scaling():
    cfg = load_config("baseline", None, [("avg.ema_tracks", "0.99,0.999"), ("avg.export", "ema")])
    assert cfg.avg.ema_tracks == [0.99, 0.999] and cfg.avg.ema_decay == 0
    for bad, match in [([("avg.ema_tracks", [1.0]), ("avg.export", "ema")], "avg.ema_tracks"),
                       ([("avg.ema_tracks", [0.9])], "avg.export=ema"),
                       ([("avg.ema_tracks", [0.9, 0.9]), ("avg.export", "ema")], "must differ"),
                       ([("avg.proxy_tokens", 0)], "avg.proxy_tokens")]:
        with pytest.raises(ConfigError, match=match):
            load_config("baseline", None, bad)
    from pgolf.config import apply_table

    cfg = RunConfig()
    apply_table(cfg, {"avg": {"ema_decay": 0.99, "ema_tracks": [0.99, 0.999], "export": "ema"}}, "preset")
    apply_table(cfg, {"scale": {"avg.ema_decay": 0.1}}, "profile")  # horizons x 0.1, every track alike
    assert cfg.avg.ema_decay == pytest.approx(0.9) and cfg.avg.ema_tracks == pytest.approx([0.9, 0.99])


def test_ema_tracks_proxy_reads_only_the_held_out_training_shard(tmp_path, monkeypatch):
    import numpy as np

    import pgolf.data.holdout as holdout
    from pgolf.data.shards import write_shard
    from pgolf.errors import DataError

    for name in ("fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"):
        write_shard(tmp_path / name, np.arange(1000, dtype=np.uint16) + (7 if "val" in name else 0))
    train = sorted(tmp_path.glob("fineweb_train_*.bin"))
    loader_files, held = holdout.holdout_split(train)
    assert loader_files == train[:-1] and held == train[-1]
    opened = []
    real = holdout.memmap_shard
    monkeypatch.setattr(holdout, "memmap_shard", lambda p: opened.append(Path(p)) or real(p))
    tokens = holdout.read_holdout_tokens(held, 99, "fineweb_train_*.bin", "fineweb_val_*.bin")
    assert opened == [held] and tokens.tolist() == list(range(900, 1000))  # the shard's last 100 tokens
    with pytest.raises(DataError, match="only training shards"):
        holdout.read_holdout_tokens(tmp_path / "fineweb_val_000000.bin", 99, "fineweb_train_*.bin", "fineweb_val_*.bin")
    with pytest.raises(DataError, match="avg.ema_tracks"):
        holdout.holdout_split(train[:1])


def test_ema_tracks_round_trip_through_the_checkpoint_state():
    import types

    from pgolf.train.loop import Trainer

    def fake(seed):
        model = _model(seed).float()
        avg = _avg(model, ema_decay=0.7, ema_tracks=[0.5, 0.9])
        t = types.SimpleNamespace(base_model=model, optimizers=[], averager=avg, qat=None, loops_pending=False,
                                  device=torch.device("cpu"))
        return t, types.SimpleNamespace(state_dict=lambda: {}, load_state_dict=lambda s: None)

    src, loader = fake(0)
    with torch.no_grad():
        for p in src.base_model.parameters():
            p.mul_(2.0)
    src.averager.after_step(src.base_model, 1, 1.0)
    state = copy.deepcopy(Trainer.checkpoint_state(src, loader, {"step": 1}))
    dst, loader2 = fake(1)
    assert Trainer.restore(dst, state, loader2) == {"step": 1}
    for a, b in zip(src.averager.tracks, dst.averager.tracks, strict=True):
        assert a.decay == b.decay and all(torch.equal(a.shadow[k], b.shadow[k]) for k in a.shadow)
    state["ema_tracks"] = state["ema_tracks"][:1]
    with pytest.raises(Exception, match="EMA tracks"):
        Trainer.restore(fake(1)[0], state, loader2)


# ---------------------------------------------------------------------------------------------
# 12. OptRot: randomised Hadamard rotation before quantisation, undone at load

INT_QUANT = dict(embed_format="int8", attn_format="int6", mlp_format="int6", other_format="int8", small_numel=0)


def test_hadamard_rotation_is_orthogonal_and_undone_exactly():
    from pgolf.quant.rotate import Rotation, hadamard_block

    assert [hadamard_block(c) for c in (512, 1536, 96, 6)] == [512, 512, 32, 2]
    g = torch.Generator().manual_seed(0)
    for cols in (64, 96, 1536):
        w = torch.randn(16, cols, generator=g)
        r = Rotation.for_tensor(7, "blocks.0.mlp.fc.weight", (16, cols))
        q = r.matrix()
        torch.testing.assert_close(q.T @ q, torch.eye(cols, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(r.apply(w).double(), w.double() @ q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r.undo(r.apply(w)), w, rtol=0, atol=1e-5)
        assert not torch.allclose(r.apply(w), w)
        x = torch.randn(50, cols, generator=g, dtype=torch.float64)
        torch.testing.assert_close(r.rotate_hessian(x.T @ x), (x @ q).T @ (x @ q))  # GPTQ's H' = Q^T H Q
    assert not torch.equal(Rotation(7, "a", 64).matrix(), Rotation(8, "a", 64).matrix())
    with pytest.raises(ConfigError, match="quant.rotate"):
        Rotation.for_tensor(0, "odd", (4, 7))
    with pytest.raises(ConfigError, match="quant.rotate"):
        load_config("baseline", None, [("quant.rotate", "givens")])


def test_rotated_artifact_decodes_within_the_quantisation_error_and_evaluates(tmp_path):
    from pgolf.quant.formats import dequantize_rows
    from pgolf.quant.artifact import build_artifact, load_artifact_model, load_artifact_state

    model = _model().float()
    _randomise(model)
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight[0, 3] = 3.0  # an outlier for the rotation to spread
    sd = model.state_dict()
    qcfg = QuantConfig(**INT_QUANT, rotate="hadamard", rotate_seed=11)
    _, qts = build_artifact(sd, model.cfg, qcfg, tmp_path / "r.pgolf", code_bytes=0)
    meta, state = load_artifact_state(tmp_path / "r.pgolf")
    build_artifact(sd, model.cfg, QuantConfig(**INT_QUANT), tmp_path / "p.pgolf", code_bytes=0)
    _, plain_state = load_artifact_state(tmp_path / "p.pgolf")
    rotated = {qt.name: qt for qt in qts if qt.rotation is not None}
    assert meta["rotate"] == {"kind": "hadamard", "seed": 11, "tensors": list(rotated)} and "blocks.0.mlp.fc.weight" in rotated
    for name, qt in rotated.items():
        w = sd[name].float()
        err_rot = qt.rotation.apply(w) - dequantize_rows(qt.values, qt.scale, qt.values.shape, torch.float32)
        # Q is orthogonal: the decoded weights carry exactly the rotated quantisation error
        torch.testing.assert_close((state[name].float() - w).norm(), err_rot.norm(), rtol=1e-4, atol=1e-6)
        # ... of the unrotated weights' size: within 10% of the plain artifact's error on the same matrix
        assert (state[name].float() - w).norm() <= 1.1 * (plain_state[name].float() - w).norm()
        assert state[name].dtype == sd[name].dtype
    ids = _ids()
    nll = {}
    for tag in ("r", "p"):
        fresh, _ = load_artifact_model(tmp_path / f"{tag}.pgolf")
        nll[tag] = fresh.float().token_nll(ids[:, :-1], ids[:, 1:]).mean()
    ref = model.token_nll(ids[:, :-1], ids[:, 1:]).mean()
    assert torch.isfinite(nll["r"]) and abs(nll["r"] - ref) <= 2 * abs(nll["p"] - ref) + 0.01 * ref


def test_rotation_with_gptq_quantises_the_rotated_layer():
    from pgolf.quant.export import dequantize_tensor, quantize_state_dict

    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g) * 0.05
    x = torch.randn(4096, 128, generator=g) * torch.linspace(0.1, 3.0, 128)  # anisotropic inputs
    h = x.T @ x / x.shape[0]
    name = "blocks.0.mlp.fc.weight"
    out_err = {}
    for hs in (None, {name: h}):
        (qt,) = quantize_state_dict({name: w}, QuantConfig(**INT_QUANT, rotate="hadamard"), hs)
        out_err[hs is not None] = ((x @ (dequantize_tensor(qt) - w).T).square().mean()).item()
    assert out_err[True] < out_err[False]  # GPTQ on Q^T H Q lowers the output error of the rotated layer


def test_corrupted_rotation_field_is_a_clear_error():
    from pgolf.errors import ArtifactError
    from pgolf.quant.container import decode_artifact, encode_artifact
    from pgolf.quant.export import quantize_state_dict

    g = torch.Generator().manual_seed(4)
    sd = {"blocks.0.mlp.fc.weight": torch.randn(32, 64, generator=g), "blocks.0.attn.scale": torch.randn(8, generator=g)}
    plain = quantize_state_dict(sd, QuantConfig(**INT_QUANT))
    good = {"kind": "hadamard", "seed": 3, "tensors": ["blocks.0.mlp.fc.weight"]}
    assert decode_artifact(encode_artifact(plain, {"rotate": good})).qtensors[0].rotation.seed == 3
    for bad, match in [({**good, "kind": "givens"}, "unknown rotation kind"), ({**good, "seed": -1}, "seed"),
                       ({**good, "seed": "3"}, "seed"), ({**good, "tensors": ["nope"]}, "not in the artifact"),
                       ({**good, "tensors": ["blocks.0.attn.scale"]}, "2-D integer"), ({"kind": "hadamard"}, "keys"),
                       ({**good, "tensors": ["blocks.0.mlp.fc.weight"] * 2}, "twice"), ("hadamard", "keys")]:
        with pytest.raises(ArtifactError, match="meta rotate"):
            decode_artifact(encode_artifact(plain, {"rotate": bad}), "bad.pgolf")
        with pytest.raises(ArtifactError, match=match):
            decode_artifact(encode_artifact(plain, {"rotate": bad}), "bad.pgolf")


def test_rotate_none_changes_nothing():
    from pgolf.quant.container import decode_artifact, encode_artifact
    from pgolf.quant.export import quantize_state_dict

    model = _model().float()
    _randomise(model)
    sd = model.state_dict()
    blobs = [encode_artifact(quantize_state_dict(sd, q), {"m": 1}) for q in
             (QuantConfig(**INT_QUANT), QuantConfig(**INT_QUANT, rotate="none", rotate_seed=9), QuantConfig(**INT_QUANT, rotate="hadamard"))]
    assert blobs[0] == blobs[1] and blobs[0] != blobs[2]
    assert "rotate" not in decode_artifact(blobs[0]).meta and all(qt.rotation is None for qt in decode_artifact(blobs[0]).qtensors)


# ---------------------------------------------------------------------------------------------
# every switch off in every preset, and one tiny run through all of them


SWITCH_DEFAULTS = {
    "model": {"mtp_heads": 0, "mlp_kind": "relu2", "value_residual": False, "tanh_reparam": 0.0},
    "optim": {"decoder_lr_mult": 1.0},
    "train": {"lr_schedule": "wallclock_warmdown", "seq_len_schedule": "", "batch_warmup_tokens": 0, "batch_warmup_steps": 0},
    "eval": {"temperature": 1.0},
    "quant": {"kure_weight": 0.0, "r2_weight": 0.0, "rotate": "none"},
    "avg": {"ema_tracks": []},
    "ttt": {"sam_rho": 0.0},
}


def test_every_switch_is_off_in_every_preset():
    from pgolf.config import list_presets

    for preset in list_presets():
        cfg = load_config(preset)
        for section, keys in SWITCH_DEFAULTS.items():
            for key, off in keys.items():
                assert getattr(getattr(cfg, section), key) == off, f"{preset}: {section}.{key}"


def test_a_tiny_run_trains_through_every_switch(demo_dir, tmp_path, monkeypatch):
    from pgolf.quant.artifact import load_artifact_state
    from pgolf.train.run import run_training
    from tests.conftest import TINY_RUN

    extra = [
        ("data.path", str(demo_dir)),
        ("model.mtp_heads", 1), ("model.mlp_kind", "swiglu"), ("model.value_residual", True), ("model.tanh_reparam", 0.2),
        ("optim.decoder_lr_mult", 2.0), ("train.lr_schedule", "d2z"), ("train.seq_len_schedule", "32:0,64:0.5"),
        ("train.batch_warmup_tokens", 256), ("train.batch_warmup_steps", 3), ("eval.temperature", 1.1),
        ("quant.kure_weight", 1e-4), ("quant.r2_weight", 1e-3),
        ("avg.ema_tracks", [0.5, 0.9]), ("avg.export", "ema"), ("avg.proxy_tokens", 300), ("quant.rotate", "hadamard"),
    ]  # fmt: skip
    import pgolf.data.holdout as holdout
    import pgolf.train.loop as loop

    opened, trained_on = [], []
    real_memmap, real_build = holdout.memmap_shard, loop.build_loader
    monkeypatch.setattr(holdout, "memmap_shard", lambda path: opened.append(Path(path)) or real_memmap(path))
    monkeypatch.setattr(loop, "build_loader", lambda cfg_data, files, *a, **k: trained_on.append(list(files)) or real_build(cfg_data, files, *a, **k))
    s = run_training(load_config("baseline", "cpu", TINY_RUN + extra), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["event"] == "train"]
    assert [r["seq_len"] for r in train] == [32, 32, 32, 64, 64, 64]  # the switch at fraction 0.5 (step 3 of 6)
    assert [round(r["lr_scale"], 6) for r in train] == [round(1 - k / 6, 6) for k in range(6)]
    assert s["tokens_seen"] == 256 + 320 + 384 + 3 * 512 == train[-1]["tokens"]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in train)
    meta, state = load_artifact_state(tmp_path / "run" / "final_model.pgolf")
    assert meta["model"]["mtp_heads"] == 0 and meta["model"]["tanh_reparam"] == 0 and meta["eval_temperature"] == 1.1
    assert not [k for k in state if k.startswith("mtp_heads.")]
    # EMA tracks: the proxy opened only the held-out (last) training shard, which never trained
    shards = sorted(demo_dir.glob("fineweb_train_*.bin"))
    assert opened == [shards[-1]] and trained_on and all(shards[-1] not in files for files in trained_on)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "ema_tracks: chose" in log and log.count("ema_tracks: track") == 2
    # OptRot: the artifact names its rotated matrices (the round-trip evaluation above read it)
    assert meta["rotate"]["kind"] == "hadamard" and meta["rotate"]["tensors"]
