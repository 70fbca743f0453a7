"""The frontier records' model techniques (frontier.md section 3): each one's defining property,
parity of every frontier preset with the independent float64 reference, the presets' exact
parameter counts, and the one-forward-path guarantee for test-time training."""

from __future__ import annotations

import copy

import pytest
import torch

from pgolf.config import list_presets, load_config
from pgolf.eval.ttt import attach_lora, linear_names
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT, build_model, count_parameters
from pgolf.model.layers import Rotary
from tests.reference_gpt import reference_loss
from tests.test_model import _randomised

# frontier.md section 0 / issue 10: the records' logged model_params.
FRONTIER_PARAMS = {
    "pr549": 26_928_220,
    "pr1218": 34_401_371,
    "pr1394": 35_943_512,
    "pr1493": 35_944_536,
    "pr1787": 35_945_658,
    "pr1855": 35_945_671,
}

# A tiny shape on which every frontier technique is still switched on: 6 layers so that a loop
# (1..2, twice more) and a decoder suffix for the parallel lanes (from layer 4) both exist.
TINY_FRONTIER = [
    ("model.num_layers", 6),
    ("model.model_dim", 32),
    ("model.num_heads", 4),
    ("model.num_kv_heads", 2),
    ("model.vocab_size", 64),
    ("model.rope_dims", 4),
    ("model.bigram_dim", 8),
    ("model.ve_dim", 8),
    ("model.xsa_last_n", 6),
]
LOOPS = [("model.loop_start", 1), ("model.loop_end", 2), ("model.num_loops", 2)]


def tiny(preset: str, extra: list | None = None) -> ModelConfig:
    cfg = load_config(preset, None, TINY_FRONTIER + (extra or [])).model
    if cfg.num_loops:
        cfg = load_config(preset, None, TINY_FRONTIER + LOOPS + (extra or [])).model
    if cfg.parallel_residual != "none":
        cfg = load_config(preset, None, TINY_FRONTIER + LOOPS * bool(cfg.num_loops) + [("model.parallel_start", 4)] + (extra or [])).model
    if cfg.bigram_buckets:
        cfg.bigram_buckets = 16
    return cfg


@pytest.mark.parametrize("preset", sorted(FRONTIER_PARAMS))
def test_frontier_preset_parameter_counts_are_the_records(preset):
    assert load_config(preset) is not None
    with torch.device("meta"):
        model = GPT(load_config(preset).model)
    assert count_parameters(model)["total"] == FRONTIER_PARAMS[preset]


def test_every_preset_declares_its_count_and_runs_at_the_cpu_profile():
    for preset in list_presets():
        cfg = load_config(preset, "cpu")
        assert cfg.model.model_dim == 128


@pytest.mark.parametrize("preset", sorted(FRONTIER_PARAMS))
@pytest.mark.parametrize("looping", [True, False])
def test_frontier_presets_match_the_independent_reference(preset, looping):
    cfg = tiny(preset)
    model = _randomised(GPT(cfg)).double()
    model.set_looping(looping)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    ids[0, 4] = cfg.bos_id  # a document boundary inside the row (SmearGate v2's BOS mask)
    targets = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    ours = model(ids, targets)
    ref = reference_loss(model.state_dict(), cfg, ids, targets, looping=looping and cfg.num_loops > 0)
    assert torch.allclose(ours, ref, rtol=1e-7, atol=1e-7), (ours.item(), ref.item())


@pytest.mark.parametrize(
    "extra",
    [
        [("model.attn_out_gate", "attn_out")],
        [("model.attn_out_gate", "attn_out"), ("model.attn_out_gate_src", "q")],
        [("model.attn_out_gate", "dense")],
        [("model.parallel_final_lane", "attn")],
        [("model.smear_bos_mask", False)],
        [("model.rope_scaling", "ntk"), ("model.rope_ntk_train_len", 4)],  # the NTK rule engages at T=9
    ],
)
def test_technique_variants_match_the_independent_reference(extra):
    cfg = tiny("pr1855", extra)
    model = _randomised(GPT(cfg)).double()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    ids[1, 3] = cfg.bos_id
    targets = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    ref = reference_loss(model.state_dict(), cfg, ids, targets)
    assert torch.allclose(model(ids, targets), ref, rtol=1e-7, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# layer loops


def test_virtual_layer_lists_of_the_records():
    r4 = load_config("pr1394").model
    assert r4.virtual_layers(True) == [0, 1, 2, 3, 4, 5, 4, 5, 4, 5, 6, 7, 8, 9, 10]
    assert r4.num_skip_weights() == 7
    r5 = load_config("pr1493").model
    m = GPT.__new__(GPT)  # only the list logic; no weights needed
    nn_init = torch.nn.Module.__init__
    nn_init(m)
    m.cfg = r5
    GPT.set_looping(m, True)
    assert m.encoder_layers == [0, 1, 2, 3, 4, 5, 3, 4]
    assert m.decoder_layers == [5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert r5.num_skip_weights() == 8
    r7 = load_config("pr1855").model
    nn_init(m)
    m.cfg = r7
    GPT.set_looping(m, True)
    assert m.decoder_layers == [5, 3, 4, 5, 6, 7] and m.lane_layers == [8, 9, 10]
    GPT.set_looping(m, False)
    assert m.encoder_layers == [0, 1, 2, 3, 4] and m.decoder_layers == [5, 6, 7] and m.lane_layers == [8, 9, 10]


def test_loops_share_weights_and_before_the_switch_equal_the_loop_free_model():
    cfg = tiny("pr1493")
    looped = _randomised(GPT(cfg))
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg.num_loops = 0
    plain = GPT(plain_cfg)
    # Loops add no weights beyond the extra skip rows (the repeated layers are the same modules).
    extra_rows = (cfg.num_skip_weights() - plain_cfg.num_skip_weights()) * cfg.model_dim * 2
    assert count_parameters(looped)["total"] == count_parameters(plain)["total"] + extra_rows
    sd = looped.state_dict()
    n = plain_cfg.num_skip_weights()
    plain.load_state_dict({k: (v[:n] if k in ("skip_weights", "skip_gates") else v) for k, v in sd.items()})
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    looped.set_looping(False)
    assert torch.equal(looped.forward_hidden(ids), plain.forward_hidden(ids))
    looped.set_looping(True)
    assert not torch.equal(looped.forward_hidden(ids), plain.forward_hidden(ids))


def test_a_fresh_model_evaluates_with_loops_on():
    assert GPT(tiny("pr1394")).looping_active


# ------------------------------------------------------------------------------------------------
# parallel residuals, skip gates, output gates, SmearGate v2, RoPE


def test_two_lane_with_identity_mixing_runs_two_independent_lanes():
    """P = I and R = 1: lane0 only ever adds attention outputs, lane1 only MLP outputs."""
    cfg = tiny("pr1855", [("model.parallel_final_lane", "attn")])
    model = _randomised(GPT(cfg))
    with torch.no_grad():
        model.parallel_post_lambdas.copy_(torch.eye(2).expand(cfg.num_layers, 2, 2))
        model.parallel_resid_lambdas.fill_(1.0)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    before = model.forward_hidden(ids)
    with torch.no_grad():
        for i in model.lane_layers:  # MLPs of the lane blocks feed lane1 only: no effect on lane0
            model.blocks[i].mlp.proj.weight.mul_(3.0)
    assert torch.equal(model.forward_hidden(ids), before)
    with torch.no_grad():
        model.blocks[model.lane_layers[0]].attn.proj.weight.mul_(3.0)
    assert not torch.equal(model.forward_hidden(ids), before)


def test_gptj_block_reads_the_same_input_in_both_branches():
    cfg = tiny("pr1493")
    block = _randomised(GPT(cfg)).blocks[5]
    x, x0 = torch.randn(2, 7, cfg.model_dim), torch.randn(2, 7, cfg.model_dim)
    h = block.mix_input(x, x0)
    assert torch.equal(block(x, x0), h + block.attn_branch(h, None) + block.mlp_branch(h))
    seq = _randomised(GPT(cfg)).blocks[2]  # below parallel_start: sequential
    h = seq.mix_input(x, x0)
    after_attn = h + seq.attn_branch(h, None)
    assert torch.equal(seq(x, x0), after_attn + seq.mlp_branch(after_attn))


def test_sigmoid_skip_gates_start_as_an_even_mix():
    model = GPT(tiny("pr1218"))
    x, s = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        model.skip_weights.copy_(torch.randn_like(model.skip_weights))
    w = model.skip_weights[1]
    assert torch.allclose(model.merge_skip(model, 1, x, s), 0.5 * x + 0.5 * w * s, atol=1e-6)


def test_sparse_attention_gate_halves_every_head_at_init_and_attn_out_gate_is_identity():
    base_cfg = tiny("pr1493")
    for kind, factor in (("sparse", 0.5), ("attn_out", 1.0)):
        cfg = copy.deepcopy(base_cfg)
        cfg.attn_out_gate = kind
        gated = GPT(cfg)
        plain = GPT(base_cfg)
        _randomised(plain)
        sd = plain.state_dict()
        gated.load_state_dict({**gated.state_dict(), **sd})
        x = torch.randn(2, 6, cfg.model_dim)
        out_g, out_p = gated.blocks[1].attn(x), plain.blocks[1].attn(x)
        assert torch.equal(out_g, factor * out_p), kind


def test_smear_v2_never_mixes_across_bos_and_leaks_without_the_fix():
    cfg = tiny("pr1855")
    model = _randomised(GPT(cfg))
    ids = torch.tensor([[5, 6, 7, 1, 8, 9]])
    e = model.tok_emb(ids)
    out = model.embed_smear(model, e, ids)
    assert torch.equal(out[:, 3], e[:, 3])  # BOS keeps its own embedding
    assert torch.equal(out[:, 0], e[:, 0])
    assert not torch.equal(out[:, 4], e[:, 4])  # other positions do smear
    ids2 = ids.clone()
    ids2[0, 2] = 11  # change the last token of the previous document
    assert torch.equal(model.embed_smear(model, model.tok_emb(ids2), ids2)[:, 3:], out[:, 3:])
    leaky_cfg = copy.deepcopy(cfg)
    leaky_cfg.smear_bos_mask = False
    leaky = GPT(leaky_cfg)
    leaky.load_state_dict(model.state_dict())
    assert not torch.equal(leaky.embed_smear(leaky, e, ids)[:, 3], e[:, 3])


def test_ntk_rope_rule_matches_the_fixed_bases_of_the_old_presets():
    """At seq 2048 the scripts' rule gives PR #401's 22081.79 (16 dims) and PR #201's 20452.23 (64
    dims); at or below the 1024 train length it leaves the base alone (the cpu profile's 256)."""
    for dims, fixed in ((16, 22081.790273476247), (64, 20452.228712025368)):
        ntk, frozen = Rotary(dims, 10000.0, 1024), Rotary(dims, fixed)
        assert ntk.base_for(2048) == fixed
        x = torch.randn(1, 2048, 2, dims)
        assert torch.equal(ntk(x), frozen(x))
        assert ntk.base_for(256) == ntk.base_for(1024) == 10000.0
    assert load_config("pr401").model.rope_scaling == "ntk"
    assert load_config("pr1394").model.rope_scaling == "none"


# ------------------------------------------------------------------------------------------------
# one forward path: TTT adapters attach to the model's own modules


@pytest.mark.parametrize("preset", list_presets())
def test_zero_lora_adapters_leave_every_preset_bit_identical(preset):
    cfg = load_config(preset, "cpu").model
    model = _randomised(build_model(cfg))
    # LoRA freezes the base weights; CPU linear kernels can differ in the last bit between weights
    # with and without requires_grad, so the plain model is frozen too (same kernels, same path).
    model.requires_grad_(False)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    targets = torch.randint(0, cfg.vocab_size, (2, 16))
    plain = model.token_nll(ids, targets)
    adapted = copy.deepcopy(model)
    targets_all = sorted({n.split(".")[-1] for n in linear_names(adapted)})
    wrapped = attach_lora(adapted, targets_all, rank=4, scale=2.0)
    assert len(wrapped) == len(linear_names(model))
    assert torch.equal(adapted.token_nll(ids, targets), plain)
    # and the adapters are live: a non-zero B changes the output
    with torch.no_grad():
        next(p for n, p in adapted.named_parameters() if n.endswith("lora_b")).fill_(0.1)
    assert not torch.equal(adapted.token_nll(ids, targets), plain)
