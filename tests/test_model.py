"""The baseline model and the record presets: state-dict names, exact parameter counts, and
loss parity with an independent float64 reference implementation."""

from __future__ import annotations

import pytest
import torch

from pgolf.config import load_config
from pgolf.model.gpt import GPT, build_model, count_parameters
from tests.reference_gpt import reference_loss

# Parameter counts of the challenge baseline and of the three submissions (techniques.md §20).
EXPECTED_PARAMS = {"baseline": 17_059_912, "pr89": 21_778_504, "pr201": 26_829_913, "pr401": 26_993_756}


@pytest.mark.parametrize("preset", sorted(EXPECTED_PARAMS))
def test_preset_parameter_counts_match_the_submissions(preset):
    model = build_model(load_config(preset).model)
    assert count_parameters(model)["total"] == EXPECTED_PARAMS[preset]


def test_baseline_state_dict_names_are_the_challenge_names():
    """The names of the challenge's train_gpt.py, so its final_model.pt loads strictly."""
    sd = build_model(load_config("baseline").model).state_dict()
    expected = {"tok_emb.weight", "skip_weights"}
    for i in range(9):
        p = f"blocks.{i}."
        expected |= {
            p + "attn_scale", p + "mlp_scale", p + "resid_mix", p + "attn.q_gain",
            p + "attn.c_q.weight", p + "attn.c_k.weight", p + "attn.c_v.weight", p + "attn.proj.weight",
            p + "mlp.fc.weight", p + "mlp.proj.weight",
        }  # fmt: skip
    assert set(sd) == expected
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["tok_emb.weight"] == (1024, 512)
    assert shapes["skip_weights"] == (4, 512)
    assert shapes["blocks.0.attn.c_k.weight"] == (256, 512)
    assert shapes["blocks.0.mlp.fc.weight"] == (1024, 512)
    assert shapes["blocks.0.resid_mix"] == (2, 512)


def test_pr401_extra_tensor_names_and_shapes():
    sd = build_model(load_config("pr401").model).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("blocks.")}
    assert shapes == {
        "tok_emb.weight": (1024, 512),
        "skip_weights": (5, 512),
        "bigram.embed.weight": (2048, 128),
        "bigram.proj.weight": (512, 128),
        "bigram.scale": (),
        "smear.gate": (512,),
        "ve_shared.embed.weight": (1024, 128),
        "ve_shared.proj.weight": (256, 128),
        "ve_shared.scale": (),
        "ve_layer_scales.0": (1,),
        "ve_layer_scales.1": (1,),
    }


def test_challenge_checkpoint_loads_strictly(tmp_path):
    """A state dict saved with the challenge's names (as final_model.pt is) loads strictly, with
    torch.load(weights_only=True), which never runs pickled code."""
    cfg = load_config("baseline", "cpu").model
    src = build_model(cfg)
    path = tmp_path / "final_model.pt"
    torch.save({k: v.clone() for k, v in src.state_dict().items()}, path)
    dst = GPT(cfg)
    dst.load_state_dict(torch.load(path, weights_only=True), strict=True)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def _randomised(model: GPT, seed: int = 0) -> GPT:
    """Every tensor random (zero-init projections and unit scales would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if p.ndim < 2 or "resid_mix" in name else 1.0 / p.shape[-1] ** 0.5
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale + (1.0 if p.ndim < 2 else 0.0) * 0.5)
    return model


TINY = [("model.num_layers", 3), ("model.model_dim", 32), ("model.num_heads", 4), ("model.num_kv_heads", 2), ("model.vocab_size", 64)]


@pytest.mark.parametrize(
    "preset,extra",
    [
        ("baseline", []),
        ("pr89", []),
        ("pr201", [("model.bigram_buckets", 16), ("model.bigram_dim", 8)]),
        ("pr401", [("model.bigram_buckets", 16), ("model.bigram_dim", 8), ("model.ve_dim", 8), ("model.rope_dims", 4), ("model.xsa_last_n", 2)]),
        ("baseline", [("model.mlp_activation", "leaky_relu2")]),
    ],
)
def test_loss_matches_independent_reference(preset, extra):
    cfg = load_config(preset, None, TINY + extra).model
    model = _randomised(GPT(cfg)).double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    ours = model(ids, targets)
    ref = reference_loss(model.state_dict(), cfg, ids, targets)
    # 1e-7: the rotary tables are computed in fp32 (as in the scripts); everything else is fp64.
    assert torch.allclose(ours, ref, rtol=1e-7, atol=1e-7), (ours.item(), ref.item())


def test_token_nll_scores_only_the_requested_positions():
    cfg = load_config("pr401", None, TINY + [("model.bigram_buckets", 16), ("model.bigram_dim", 8), ("model.ve_dim", 8), ("model.rope_dims", 4), ("model.xsa_last_n", 2)]).model
    model = _randomised(GPT(cfg)).double()
    ids = torch.randint(0, cfg.vocab_size, (3, 12))
    targets = torch.randint(0, cfg.vocab_size, (3, 12))
    full = model.token_nll(ids, targets)
    assert full.shape == (3, 12)
    assert torch.allclose(full.mean(), model(ids, targets))
    tail = model.token_nll(ids, targets, first_scored=8)
    assert tail.shape == (3, 4)
    assert torch.allclose(tail, full[:, 8:])


def test_zero_init_projections_make_blocks_identity_at_init():
    cfg = load_config("baseline", "cpu").model
    model = build_model(cfg)
    for block in model.blocks:
        assert torch.count_nonzero(block.attn.proj.weight) == 0
        assert torch.count_nonzero(block.mlp.proj.weight) == 0
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    x = torch.nn.functional.rms_norm(model.tok_emb(ids), (cfg.model_dim,))
    # With identity blocks and skip weights of one, the residual stream only accumulates the skips.
    hidden = model.forward_hidden(ids)
    assert hidden.shape == (1, 16, cfg.model_dim)
    assert torch.isfinite(hidden).all() and x.shape == hidden.shape


def test_seeded_init_is_deterministic():
    cfg = load_config("pr401", "cpu").model
    torch.manual_seed(7)
    a = build_model(cfg).state_dict()
    torch.manual_seed(7)
    b = build_model(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
