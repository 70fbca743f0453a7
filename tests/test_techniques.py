"""The defining property of each technique of the record stacks, one test each (or a few)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pgolf.config import load_config
from pgolf.model.bigram import bigram_bucket_ids
from pgolf.model.gpt import GPT, build_model, overtone_spectrum_
from pgolf.model.layers import RMSNorm, Rotary
from pgolf.model.smear import SmearGate
from pgolf.model.xsa import ExclusiveSelfAttention
from pgolf.optim.groups import build_optimizers, split_parameters
from pgolf.optim.muon import newton_schulz5, shape_factor
from pgolf.optim.normuon import normuon_row_normalise
from pgolf.train.averaging import EMA, SnapshotMean, WeightAverager
from pgolf.train.config import AveragingConfig


def test_xsa_output_is_orthogonal_to_the_tokens_own_value():
    torch.manual_seed(0)
    b, t, h, hkv, d = 2, 5, 8, 4, 16
    y = torch.randn(b, t, h, d, dtype=torch.float64)
    v = torch.randn(b, t, hkv, d, dtype=torch.float64)
    out = ExclusiveSelfAttention()(y, v)
    group = h // hkv
    for head in range(h):
        own_v = v[:, :, head // group]  # query head h reads KV head h // group
        assert torch.allclose((out[:, :, head] * own_v).sum(-1), torch.zeros(b, t, dtype=torch.float64), atol=1e-12)
    # and it only removes that one direction: the orthogonal part of y is untouched
    vhat = F.normalize(v[:, :, 0], dim=-1)
    resid = y[:, :, 0] - (y[:, :, 0] * vhat).sum(-1, keepdim=True) * vhat
    assert torch.allclose(out[:, :, 0], resid)


def test_partial_rope_leaves_dims_beyond_rope_dims_unchanged():
    x = torch.randn(1, 7, 3, 64)
    out = Rotary(16, 22081.79)(x)
    assert torch.equal(out[..., 16:], x[..., 16:])
    assert not torch.allclose(out[:, 1:, :, :16], x[:, 1:, :, :16])
    assert torch.allclose(out[:, 0], x[:, 0])  # position 0 is not rotated


def test_rope_is_relative_position_invariant_on_rotated_dims():
    rot = Rotary(16, 10000.0)
    torch.manual_seed(1)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    seq = torch.zeros(1, 40, 1, 16, dtype=torch.float64)

    def rotated_at(vec, pos):
        s = seq.clone()
        s[0, pos, 0] = vec
        return rot(s)[0, pos, 0]

    dots = [torch.dot(rotated_at(q, m), rotated_at(k, m - 5)).item() for m in (5, 12, 30, 39)]
    assert max(dots) - min(dots) < 1e-6  # cos/sin tables are fp32, as in the scripts


def test_smeargate_at_init_mixes_exactly_half_of_the_previous_token():
    sg = SmearGate(8, bos_id=None)
    x = torch.randn(2, 6, 8)
    ids = torch.randint(2, 10, (2, 6))
    out = sg(x, ids)
    assert torch.allclose(out[:, 1:], 0.5 * x[:, 1:] + 0.5 * x[:, :-1])
    assert torch.allclose(out[:, 0], 0.5 * x[:, 0])  # x_{-1} = 0


def test_smeargate_formula_with_a_learned_gate():
    sg = SmearGate(4, bos_id=None)
    with torch.no_grad():
        sg.gate.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
    x = torch.randn(1, 3, 4)
    g = torch.sigmoid(sg.gate)
    out = sg(x, torch.zeros(1, 3, dtype=torch.long))
    assert torch.allclose(out[0, 2], (1 - g) * x[0, 2] + g * x[0, 1])


def test_document_aware_smeargate_does_not_mix_across_bos():
    sg = SmearGate(8, bos_id=1)
    x = torch.randn(1, 6, 8)
    ids = torch.tensor([[1, 5, 6, 1, 7, 8]])
    out = sg(x, ids)
    assert torch.equal(out[0, 3], x[0, 3])  # a BOS keeps its own embedding
    assert torch.allclose(out[0, 4], 0.5 * x[0, 4] + 0.5 * x[0, 3])


def test_bigram_hash_reserves_the_last_bucket_for_the_first_position():
    ids = torch.tensor([[5, 9, 1023, 0, 7], [3, 3, 3, 3, 3]])
    h = bigram_bucket_ids(ids, 2048)
    assert (h[:, 0] == 2047).all()
    for row in range(2):
        for i in range(1, 5):
            cur, prev = int(ids[row, i]), int(ids[row, i - 1])
            assert int(h[row, i]) == ((36313 * cur) ^ (27191 * prev)) % 2047
    assert int(h[:, 1:].max()) < 2047


def test_document_aware_bigram_gives_bos_the_reserved_bucket():
    ids = torch.tensor([[5, 9, 1, 7]])
    assert bigram_bucket_ids(ids, 64, bos_id=1)[0, 2] == 63
    assert bigram_bucket_ids(ids, 64)[0, 2] != 63 or ((36313 * 1) ^ (27191 * 9)) % 63 == 63


def test_ln_scale_divides_block_norm_outputs_by_sqrt_of_layer_plus_one():
    cfg = load_config("pr401", "cpu").model
    model = GPT(cfg)
    x = torch.randn(2, 4, cfg.model_dim)
    for i, block in enumerate(model.blocks):
        expected = F.rms_norm(x, (cfg.model_dim,)) / math.sqrt(i + 1)
        assert torch.allclose(block.attn_norm(x), expected, atol=1e-6)
        assert torch.allclose(block.mlp_norm(x), expected, atol=1e-6)
    assert RMSNorm().scale == 1.0


def test_xsa_and_ve_are_on_the_configured_blocks_only():
    cfg = load_config("pr401").model
    model = GPT(cfg)
    xsa = [i for i, b in enumerate(model.blocks) if isinstance(b.attn.xsa, ExclusiveSelfAttention)]
    assert xsa == [7, 8, 9, 10]
    assert [i for i, s in enumerate(model.ve_slot) if s >= 0] == [9, 10]


def test_value_embedding_reaches_only_the_values_of_its_blocks():
    cfg = load_config("pr401", "cpu").model
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    ves = model.value_embeds(ids, torch.float32)
    base = model.ve_shared(ids, torch.float32)
    for i, ve in enumerate(ves):
        if i in (9, 10):
            assert torch.allclose(ve, base * model.ve_layer_scales[i - 9])
        else:
            assert ve is None


def test_normuon_equalises_row_rms_and_keeps_the_frobenius_norm():
    torch.manual_seed(0)
    u = torch.randn(6, 10) * torch.tensor([0.1, 1, 2, 5, 10, 0.5])[:, None]
    v = torch.zeros(6, 1)
    out = normuon_row_normalise(u, v, beta2=0.0)  # beta2=0: v is exactly this step's row mean
    row_rms = out.square().mean(dim=1).sqrt()
    assert torch.allclose(row_rms, row_rms.mean().expand(6), rtol=1e-4)
    assert torch.allclose(out.norm(), u.norm(), rtol=1e-5)


def test_newton_schulz_output_is_close_to_orthogonal_and_shape_factor():
    torch.manual_seed(0)
    g = torch.randn(64, 32)
    x = newton_schulz5(g).float()
    s = torch.linalg.svdvals(x)
    assert 0.5 < s.min() and s.max() < 1.3  # NS5 pushes every singular value towards 1
    assert shape_factor(torch.empty(1536, 512)) == pytest.approx(math.sqrt(3))
    assert shape_factor(torch.empty(512, 128)) == pytest.approx(2.0)
    assert shape_factor(torch.empty(256, 512)) == 1.0


def test_ema_after_k_steps_equals_the_closed_form():
    model = torch.nn.Linear(3, 2, bias=False)
    d = 0.9
    w0 = model.weight.detach().clone()
    ema = EMA(model, d)
    history = []
    for k in range(5):
        with torch.no_grad():
            model.weight.add_(torch.full_like(model.weight, 0.1 * (k + 1)))
        history.append(model.weight.detach().clone())
        ema.update(model)
    k = len(history)
    closed = d**k * w0 + sum((1 - d) * d ** (k - 1 - j) * w for j, w in enumerate(history))
    assert torch.allclose(ema.shadow["weight"], closed, atol=1e-6)


def test_swa_of_ema_snapshots_equals_their_mean():
    model = torch.nn.Linear(4, 4, bias=False)
    cfg = AveragingConfig(ema_decay=0.5, swa_every=2, swa_start_scale=0.2, swa_source="ema", export="swa")
    avg = WeightAverager(cfg, model)
    snaps = []
    for step in range(1, 9):
        with torch.no_grad():
            model.weight.mul_(1.1).add_(0.01)
        scale = 0.1 if step >= 4 else 1.0
        avg.after_step(model, step, scale)
        if scale < 0.2 and step % 2 == 0:
            snaps.append(avg.ema.shadow["weight"].clone())
    assert len(snaps) == 3 and avg.swa.count == 3
    exported, msg = avg.export_state(model)
    assert torch.allclose(exported["weight"], torch.stack(snaps).mean(0))
    assert "3 checkpoints" in msg
    mean = SnapshotMean()
    for s in snaps:
        mean.add({"w": s})
    assert torch.allclose(mean.mean()["w"], torch.stack(snaps).mean(0))


def test_swa_with_one_snapshot_falls_back_to_its_source():
    model = torch.nn.Linear(2, 2, bias=False)
    avg = WeightAverager(AveragingConfig(ema_decay=0.9, swa_every=5, swa_start_scale=0.5, swa_source="ema", export="swa"), model)
    for step in range(1, 6):
        avg.after_step(model, step, 0.1)
    exported, msg = avg.export_state(model)
    assert "ema" in msg and torch.allclose(exported["weight"], avg.ema.shadow["weight"])


def test_muon_weight_decay_touches_only_the_matrix_group():
    cfg = load_config("baseline", "cpu", [("optim.muon_wd", 0.5), ("optim.adam_wd", 0.0), ("model.num_layers", 2)])
    model = build_model(cfg.model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opts = build_optimizers(model, cfg.optim, True)
    for o in opts:
        for g in o.param_groups:
            g["lr"] = 0.1
        o.step()
    groups = split_parameters(model).names()
    for name, p in model.named_parameters():
        if name in groups["matrix"]:
            assert torch.allclose(p, before[name] * (1 - 0.1 * 0.5)), name
        else:
            assert torch.equal(p, before[name]), name  # zero grad + no Adam WD: untouched


def test_pr401_adamw_decays_control_tensors_as_the_submission_does():
    """PR #401's AdamW WD pulls every Adam-group tensor (incl. control scalars) toward 0."""
    cfg = load_config("pr401", "cpu", [("model.num_layers", 2), ("model.xsa_last_n", 1)])
    model = build_model(cfg.model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = model.blocks[0].attn_scale.detach().clone()
    for o in build_optimizers(model, cfg.optim, True):
        o.step()
    lr, wd = cfg.optim.scalar_lr, cfg.optim.adam_wd
    assert torch.allclose(model.blocks[0].attn_scale, before * (1 - lr * wd))


def test_optimizer_groups_follow_the_submissions():
    groups = split_parameters(build_model(load_config("pr401").model)).names()
    assert set(groups["token"]) == {"tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight"}
    assert "bigram.proj.weight" in groups["matrix"] and "ve_shared.proj.weight" in groups["matrix"]
    assert len([n for n in groups["matrix"] if n.startswith("blocks.")]) == 66
    assert {"smear.gate", "bigram.scale", "ve_shared.scale", "skip_weights", "blocks.0.resid_mix"} <= set(groups["scalar"])
    groups89 = split_parameters(build_model(load_config("pr89").model)).names()
    assert len(groups89["matrix"]) == 54 and groups89["token"] == ["tok_emb.weight"]


def test_overtone_init_gives_a_power_law_spectrum_with_the_same_singular_vectors():
    torch.manual_seed(0)
    w = torch.randn(64, 32) * 0.005
    u0, s0, v0 = torch.linalg.svd(w, full_matrices=False)
    overtone_spectrum_(w)
    u1, s1, v1 = torch.linalg.svd(w, full_matrices=False)
    k = torch.arange(1, 33, dtype=torch.float32)
    assert torch.allclose(s1, s0[0] / k.sqrt(), rtol=1e-4)
    assert torch.allclose((u0 * u1).sum(0).abs(), torch.ones(32), atol=1e-3)


def test_orthogonal_init_and_depth_scaled_projections():
    cfg = load_config("pr401").model
    torch.manual_seed(0)
    model = GPT(cfg)
    wq = model.blocks[0].attn.c_q.weight
    assert torch.allclose(wq @ wq.T, torch.eye(512), atol=1e-4)
    wk = model.blocks[0].attn.c_k.weight  # 256 x 512: orthonormal rows
    assert torch.allclose(wk @ wk.T, torch.eye(256), atol=1e-4)
    scale = 1 / math.sqrt(22)
    p = model.bigram.proj.weight  # 512 x 128: orthonormal columns, scaled by 1/sqrt(2L)
    assert torch.allclose(p.T @ p, scale**2 * torch.eye(128), atol=1e-5)
    assert torch.count_nonzero(model.blocks[3].attn.proj.weight) == 0  # zero-init stays zero
    assert torch.count_nonzero(model.bigram.embed.weight) == 0


def test_pr201_bigram_branch_learns_unlike_the_submitted_code():
    """PR #201's code zeroed both the table and the projection: every gradient was 0. The preset
    builds the intent (zero projection, non-zero table), so the projection gets gradient."""
    cfg = load_config("pr201", "cpu", [("model.num_layers", 2)]).model
    model = build_model(cfg)
    assert torch.count_nonzero(model.bigram.proj.weight) == 0
    assert torch.count_nonzero(model.bigram.embed.weight) > 0
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    model(ids, torch.roll(ids, -1, 1)).backward()
    assert model.bigram.proj.weight.grad.abs().sum() > 0
    # the submitted code's state (both zero) is a saddle: all three gradients vanish
    with torch.no_grad():
        model.bigram.embed.weight.zero_()
    model.zero_grad()
    model(ids, torch.roll(ids, -1, 1)).backward()
    for p in (model.bigram.proj.weight, model.bigram.embed.weight, model.bigram.scale):
        assert p.grad is None or p.grad.abs().sum() == 0


def test_leaky_relu_squared_keeps_a_gradient_for_negative_inputs():
    cfg = load_config("baseline", "cpu", [("model.mlp_activation", "leaky_relu2"), ("model.num_layers", 1)]).model
    mlp = build_model(cfg).blocks[0].mlp
    z = torch.tensor([-2.0, 3.0])
    h = F.leaky_relu(z, mlp.negative_slope).square()
    assert torch.allclose(h, torch.tensor([0.25 * 4.0, 9.0]))
