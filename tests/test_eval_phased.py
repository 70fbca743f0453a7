"""Phased TTT (frontier.md 3.18): documents split at BOS and each target scored exactly once,
per-document batched LoRA on the model's own modules (zero B = the base model bit for bit for
every preset, one adapter per document and per virtual layer slot), phased TTT with every
learning rate 0 = plain document scoring bit for bit, global SGD phases on exactly the scored
prefix, and adaptation that helps."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch

from pgolf.config import list_presets, load_config
from pgolf.errors import ConfigError
from pgolf.eval.bpb import ByteLUT
from pgolf.eval.config import TTTConfig
from pgolf.eval.documents import batch_queue, chunk_batch, evaluate_documents, split_documents
from pgolf.eval.lora import DocLoRA, SlotAdapted
from pgolf.eval.phased import PhasedTTT, evaluate_phased, phase_triggers
from pgolf.eval.standard import evaluate_standard
from pgolf.model.gpt import GPT, build_model
from pgolf.model.layers import CastedLinear
from tests.test_eval_helpers import one_thread  # noqa: F401

V, BOS, L = 64, 1, 32
# pr1855's stack, tiny: loops 1..2 (10 virtual slots for 6 layers), two lanes from 4, sparse gate,
# SmearGate v2 with the BOS mask, skip gates, XSA everywhere.
FRONTIER_TINY = [("model.vocab_size", V), ("model.num_layers", 6), ("model.loop_start", 1), ("model.loop_end", 2),
                 ("model.parallel_start", 4), ("model.xsa_last_n", 6), ("model.model_dim", 32), ("model.num_heads", 2),
                 ("model.num_kv_heads", 1)]


def randomised(model: GPT, seed: int = 0) -> GPT:
    """Every weight random (zero-initialised projections and gates too), so that every path and
    adapter gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def frontier_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return randomised(build_model(load_config("pr1855", "cpu", FRONTIER_TINY).model), seed)


def doc_lut() -> ByteLUT:
    """1-3 bytes per token, BOS (1) and 0 control tokens (0 bytes, boundary)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(1, 4, (V,), generator=g).to(torch.int16)
    base[:2] = 0
    space = torch.rand(V, generator=g) < 0.3
    space[:2] = False
    return ByteLUT(base, space, torch.arange(V) < 2)


def doc_stream(n_docs: int, seed: int = 0, lo: int = 3, hi: int = 90, vocab_per_doc: int = 0) -> torch.Tensor:
    """BOS + random tokens per document; ``vocab_per_doc`` > 0 draws each document from its own
    small set of tokens (a within-document regularity that adaptation can learn)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(n_docs):
        n = int(torch.randint(lo, hi, (1,), generator=g))
        if vocab_per_doc:
            pool = torch.randperm(V - 2, generator=g)[:vocab_per_doc] + 2
            body = pool[torch.randint(vocab_per_doc, (n,), generator=g)]
        else:
            body = torch.randint(2, V, (n,), generator=g)
        parts.append(torch.cat((torch.tensor([BOS]), body)))
    return torch.cat(parts)


def phased_cfg(**kw) -> TTTConfig:
    base = dict(mode="phased", batch_docs=4, doc_chunk=8, doc_lora_rank=4, doc_lora_alpha=8.0, doc_lora_lr=1e-3,
                prefix_docs=8, phases=2, chunk_tokens=96, batch_seqs=4, seq_len=L, global_lr=0.01)
    base.update(kw)
    return TTTConfig(**base)


# ---- documents ---------------------------------------------------------------------------------


def test_documents_tile_the_targets_and_the_queue_runs_longest_first() -> None:
    tokens = torch.tensor([1, 5, 6, 1, 7, 1, 1, 8, 9, 9, 1])  # N = 10 targets; last token BOS
    d = split_documents(tokens, BOS)
    assert d.starts.tolist() == [0, 3, 5, 6] and d.lengths.tolist() == [3, 2, 1, 4]
    # the next document's BOS is each document's last target (target s_k + n_k - 1 is token s_k + n_k)
    assert all(int(tokens[s + n]) == BOS for s, n in zip(d.starts.tolist(), d.lengths.tolist()))
    no_bos = split_documents(torch.tensor([4, 5, 1, 6, 7]), BOS)  # a leading fragment is a document
    assert no_bos.starts.tolist() == [0, 2] and no_bos.lengths.tolist() == [2, 2]
    assert split_documents(torch.tensor([4, 5, 6]), BOS).lengths.tolist() == [2]
    stream = doc_stream(23, seed=3)
    docs = split_documents(stream, BOS)
    queue = batch_queue(docs, 5)
    assert sorted(torch.cat(queue).tolist()) == list(range(23)) and [b.numel() for b in queue] == [3, 5, 5, 5, 5]
    maxima = [int(docs.lengths[b].max()) for b in queue]
    assert maxima == sorted(maxima, reverse=True)  # longest batch first
    for b in queue:
        assert docs.lengths[b].tolist() == sorted(docs.lengths[b].tolist())  # ascending inside


def test_chunk_windows_score_each_chunk_with_its_documents_context_only() -> None:
    stream = doc_stream(6, seed=4, lo=20, hi=80)
    docs = split_documents(stream, BOS)
    batch = batch_queue(docs, 6)[0]
    C, W = 8, 24
    seen = torch.zeros(stream.numel() - 1, dtype=torch.int32)
    for c in range(-(-int(docs.lengths.max()) // C)):
        cb = chunk_batch(stream, docs, batch, c, C, W, torch.device("cpu"))
        ids = batch[cb.rows]
        assert cb.x.shape[1] == min((c + 1) * C, W) and cb.x.shape[1] - cb.first == C
        for r, k in enumerate(ids.tolist()):
            s, n = int(docs.starts[k]), int(docs.lengths[k])
            valid = cb.valid[r]
            pos = cb.positions[r][valid]
            assert pos.tolist() == list(range(s + c * C, s + min((c + 1) * C, n)))  # exactly chunk c
            ws = max(0, (c + 1) * C - W)
            row = cb.x[r, : int(valid.sum()) + cb.first]
            assert torch.equal(row, stream[s + ws : s + ws + row.numel()])  # only its own document
            assert torch.equal(cb.y[r, cb.first :][valid], stream[pos + 1])
            j = pos - s  # document-relative target index; its context is tokens ws..j of the document
            assert bool(((j - ws) >= torch.clamp(j, max=W - C)).all())  # all of it, or at least W - C earlier tokens
            assert bool(cb.has_next[r]) == (n > (c + 1) * C)
            seen[pos] += 1
    assert torch.equal(seen, torch.ones_like(seen))


def test_document_scoring_counts_every_target_and_byte_once_as_the_standard_eval() -> None:
    model, lut = frontier_model(), doc_lut()
    stream = doc_stream(30, seed=5)
    n = ((stream.numel() - 1) // L) * L
    stream = stream[: n + 1]
    std = evaluate_standard(model.token_nll, stream, L, lut, batch_tokens=4 * L, device=torch.device("cpu"))
    out = torch.zeros(n, dtype=torch.float64)
    res = evaluate_documents(model, stream, lut, seq_len=L, chunk=8, batch_docs=4, token_nll_out=out)
    assert (res.targets, res.bytes) == (std.targets, std.bytes) == (n, int(lut.target_bytes(stream[:-1], stream[1:]).sum()))
    assert bool((out > 0).all())
    # a document's scores do not depend on the other documents (batch-mates, padding): to fp noise
    docs = split_documents(stream, BOS)
    k = 7
    s, m = int(docs.starts[k]), int(docs.lengths[k])
    alone = torch.zeros(m, dtype=torch.float64)
    evaluate_documents(model, stream[s : s + m + 1], lut, seq_len=L, chunk=8, batch_docs=4, token_nll_out=alone)
    assert torch.allclose(alone, out[s : s + m], rtol=0, atol=2e-5)


# ---- batched per-document LoRA -----------------------------------------------------------------


@pytest.mark.parametrize("preset", list_presets())
def test_zero_b_document_adapters_leave_every_preset_bit_identical(preset: str) -> None:
    cfg = load_config(preset, "cpu").model
    torch.manual_seed(0)
    model = randomised(build_model(cfg))
    model.requires_grad_(False)  # adapters freeze the base; freeze the plain model too (same CPU kernels)
    ids = torch.randint(0, cfg.vocab_size, (3, 12))
    targets = torch.randint(0, cfg.vocab_size, (3, 12))
    plain = model.token_nll(ids, targets)
    adapted = copy.deepcopy(model)
    lora = DocLoRA(adapted, 3, rank=2, alpha=4.0)
    lora.reset(torch.Generator().manual_seed(1))
    virtual = len(model.encoder_layers) + len(model.decoder_layers) + len(model.lane_layers)
    assert lora.num_slots == virtual and len(lora.adapters) == 5 * virtual + 1
    assert torch.equal(lora.token_nll(ids, targets), plain)
    with torch.no_grad():  # adapters are live and per document: B of document 0 touches row 0 only
        lora.wrappers[0].adapters[0].lora_b[0].fill_(0.3)
        lora.head.lora_b[0].fill_(0.3)
    moved = lora.token_nll(ids, targets)
    assert not torch.equal(moved[0], plain[0]) and torch.equal(moved[1:], plain[1:])
    lora.detach()
    assert torch.equal(adapted.token_nll(ids, targets), plain)
    assert not any(isinstance(m, SlotAdapted) for m in adapted.modules())


def test_every_virtual_slot_has_its_own_adapters() -> None:
    model = frontier_model()
    virtual = model.encoder_layers + model.decoder_layers + model.lane_layers
    assert len(virtual) == 10 and virtual.count(1) == virtual.count(2) == 3  # loop 1..2 run 3 times
    lora = DocLoRA(model, 2, rank=3, alpha=3.0)
    lora.reset(torch.Generator().manual_seed(2))
    ids = torch.randint(2, V, (2, 10))
    lora.token_nll(ids, ids).sum().backward()
    for w in lora.wrappers:  # block i's wrappers hold one adapter per occurrence of i, each one used
        assert len(w.adapters) in (1, 3)
        for a in w.adapters:
            assert a.lora_b.grad is not None and bool((a.lora_b.grad.abs().sum(dim=(1, 2)) > 0).all())
    assert lora.head.lora_b.grad.abs().sum() > 0
    # slot k of a looped block acts on its k-th call only: the two slots differ in effect
    lora.reset(torch.Generator().manual_seed(2))
    looped = next(w for w in lora.wrappers if len(w.adapters) == 3)
    outs = []
    with torch.no_grad():
        for k in range(3):
            lora.reset(None)
            looped.adapters[k].lora_b.fill_(0.2)
            outs.append(lora.token_nll(ids, ids))
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    model.set_looping(False)  # another layer list than the adapters were built for: an error
    with pytest.raises(AssertionError, match="once per virtual slot"):
        lora.token_nll(ids, ids)


# ---- the phased protocol -----------------------------------------------------------------------


def test_phase_boundaries_follow_the_records_formula() -> None:
    # R7: P = 2500, K = 3 -> boundaries 833, 1666, 2500 documents
    counts = [16] + [64] * 781
    trig = phase_triggers(counts, 2500, 3)
    assert [t.boundary for t in trig] == [833, 1666, 2500]
    assert [t.after_batch for t in trig] == [13, 26, 39]  # first batch with 16 + 64 q >= boundary
    assert phase_triggers([4, 4], 8, 1) == []  # nothing left to score after the last batch
    assert [t.boundary for t in phase_triggers([4] * 5, 2, 3)] == [1, 2]  # boundary 0 skipped


def test_phased_with_every_learning_rate_zero_equals_document_scoring_bit_for_bit() -> None:
    model, lut = frontier_model(), doc_lut()
    stream = doc_stream(22, seed=6)  # a short first batch (22 = 2 + 4 x 5), 3 phases
    plain = torch.zeros(stream.numel() - 1, dtype=torch.float64)
    ref = evaluate_documents(model, stream, lut, seq_len=L, chunk=8, batch_docs=4, token_nll_out=plain)
    for warm in (True, False):
        cfg = phased_cfg(doc_lora_lr=0.0, global_lr=0.0, phases=3, prefix_docs=15, warm_start_a=warm, grad_steps=2)
        out = torch.zeros_like(plain)
        o = evaluate_phased(model, stream, lut, cfg, seq_len=L, token_nll_out=out)
        assert torch.equal(out, plain) and o.result.nll_sum == ref.nll_sum
        assert (o.result.targets, o.result.bytes) == (ref.targets, ref.bytes)
        assert [p.boundary_docs for p in o.phases] == [5, 10, 15] and o.lora_steps > 0  # the machinery ran
        assert all(p.sgd_steps > 0 for p in o.phases)
        assert sum(s["targets"] for s in o.segments) == ref.targets and sum(s["docs"] for s in o.segments) == 22


def test_phases_train_on_exactly_the_scored_prefix_and_adaptation_changes_the_score() -> None:
    model, lut = frontier_model(), doc_lut()
    stream = doc_stream(20, seed=7)
    runner = PhasedTTT(model, stream, lut, phased_cfg(), seq_len=L)
    log: list[tuple] = []
    process, phase_docs = runner.process_batch, runner.phase_documents
    runner.process_batch = lambda q: (log.append(("batch", q)), process(q))[1]

    def spy(trigger):
        ids, n = phase_docs(trigger)
        log.append(("phase", trigger.phase, ids.tolist(), n))
        return ids, n

    runner.phase_documents = spy
    o = runner.run()
    queue_order = torch.cat(runner.queue).tolist()
    phases = [e for e in log if e[0] == "phase"]
    assert [len(e[2]) for e in phases] == [4, 8]
    for e in phases:
        before = [q for kind, q, *_ in log[: log.index(e)] if kind == "batch"]
        scored = [d for q in before for d in runner.queue[q].tolist()]
        assert e[2] == queue_order[: len(e[2])] and set(e[2]) <= set(scored) and e[3] == len(scored)
    assert [e[1] for e in log if e[0] == "batch"] == list(range(5))
    plain = evaluate_documents(model, stream, lut, seq_len=L, chunk=8, batch_docs=4)
    assert o.result.nll_sum != plain.nll_sum and o.result.targets == plain.targets
    assert sum(s["targets"] for s in o.segments) == plain.targets


def test_document_adaptation_helps_on_documents_with_their_own_vocabulary() -> None:
    """Each document draws from 6 tokens of its own: the head adapters learn that within the
    document, after scoring each chunk."""
    model, lut = frontier_model(seed=3), doc_lut()
    stream = doc_stream(12, seed=8, lo=80, hi=120, vocab_per_doc=6)
    plain = evaluate_documents(model, stream, lut, seq_len=L, chunk=8, batch_docs=4)
    o = evaluate_phased(model, stream, lut, phased_cfg(doc_lora_lr=0.02, doc_weight_decay=0.0, phases=0), seq_len=L)
    assert o.result.val_bpb < plain.val_bpb - 0.05


def test_the_artifact_model_is_never_modified() -> None:
    model, lut = frontier_model(), doc_lut()
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()
    evaluate_phased(model, doc_stream(10, seed=9), lut, phased_cfg(prefix_docs=4, phases=1), seq_len=L)
    assert hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest() == digest
    assert model.adapt_logits.__name__ == "unadapted_logits"
    assert not any(isinstance(m, SlotAdapted) for m in model.modules())
    assert all(isinstance(b.attn.c_q, CastedLinear) for b in model.blocks)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "kw, match",
    [(dict(batch_docs=0), "ttt.batch_docs"), (dict(doc_chunk=0), "ttt.doc_chunk"), (dict(phases=-1), "ttt.phases"),
     (dict(doc_lora_targets=["q", "z"]), "ttt.doc_lora_targets"), (dict(doc_beta2=1.0), "ttt.doc_beta2"),
     (dict(mode="phasd"), "ttt.mode")],
)
def test_bad_phased_settings_are_config_errors(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        phased_cfg(**kw).validate()
    with pytest.raises(ConfigError, match="ttt.doc_chunk: 64 is longer"):
        PhasedTTT(frontier_model(), doc_stream(3), doc_lut(), phased_cfg(doc_chunk=64), seq_len=L)


def test_record_presets_carry_the_records_phased_settings() -> None:
    r7, r6 = load_config("pr1855").ttt, load_config("pr1787").ttt
    for t in (r6, r7):
        assert (t.mode, t.batch_docs, t.doc_chunk, t.doc_lora_alpha, t.doc_lora_lr, t.warm_start_a, t.phases) == ("phased", 64, 48, 144.0, 1e-4, True, 3)
        assert (t.global_lr, t.global_epochs, t.chunk_tokens, t.momentum, t.grad_clip) == (0.001, 1, 32768, 0.9, 1.0)
    assert (r7.doc_lora_rank, r7.doc_beta2, r7.doc_weight_decay, r7.prefix_docs) == (80, 0.99, 0.5, 2500)
    assert (r6.doc_lora_rank, r6.doc_beta2, r6.doc_weight_decay, r6.prefix_docs) == (96, 0.999, 1.0, 2000)


def test_the_phased_estimate_counts_every_chunk_window_and_the_phases() -> None:
    from pgolf.eval.budget import estimate_8xh100, forward_cost, phased_flops

    cfg = load_config("pr1855", "cpu", FRONTIER_TINY).model
    lengths, W, C = [5, 50, 130, 7], 64, 16
    t = phased_cfg(doc_chunk=C, prefix_docs=2, phases=2, chunk_tokens=40, seq_len=32, global_epochs=2)
    direct = 0.0
    for n in lengths:  # every chunk: a forward of its window; trained chunks (not the last) 3 forwards
        k = -(-n // C)
        for c in range(k):
            w = min((c + 1) * C, W)
            cost = forward_cost(cfg, w)
            direct += (3.0 if c < k - 1 else 1.0) * (cost.body + cost.head * min(C, n - c * C))
    score, sgd = phased_flops(cfg, lengths, W, t, n_docs=len(lengths))
    assert score == pytest.approx(direct, rel=1e-6)  # (the body is fitted as a w + b w^2 from two windows)
    # phase 1 trains on the longest document (130 tokens: 4 chunks of 40, 3 trained), phase 2 on the
    # two longest (180: 5 chunks, 4 trained); 2 epochs, 3 forwards per sequence of 32
    seq = forward_cost(cfg, 32).flops(32)
    assert sgd == pytest.approx(3.0 * seq * 2 * (3 * 40 + 4 * 40) / 32, rel=1e-12)
    # scaled to the official 50,000 documents; fits in 600 s or not, it is reported
    est = estimate_8xh100(load_config("pr1855").model, 2048, 0, load_config("pr1855").ttt, doc_lengths=[957] * 100)
    assert est.ttt_s > 0 and est.sliding_s is None and "phased TTT" in est.assumption()


def test_bytes_come_from_the_sidecar_when_the_data_has_one() -> None:
    from pgolf.eval.bpb import SidecarBytes

    model = frontier_model()
    stream = doc_stream(9, seed=11)
    side = torch.randint(0, 5, (stream.numel(),), generator=torch.Generator().manual_seed(3)).to(torch.int32)
    side[stream == BOS] = 0
    counter = SidecarBytes(side)
    docs = evaluate_documents(model, stream, counter, seq_len=L, chunk=8, batch_docs=4)
    o = evaluate_phased(model, stream, counter, phased_cfg(prefix_docs=4, phases=1), seq_len=L)
    assert docs.bytes == o.result.bytes == int(side[1:].sum())  # target i is worth sidecar[i + 1]


def test_the_phased_estimate_counts_every_lora_step():
    import dataclasses

    from pgolf.eval.budget import phased_flops

    cfg = load_config("pr1855")
    one, _ = phased_flops(cfg.model, [3000] * 50, 2048, cfg.ttt)
    two, _ = phased_flops(cfg.model, [3000] * 50, 2048, dataclasses.replace(cfg.ttt, grad_steps=2))
    one_chunk, _ = phased_flops(cfg.model, [10] * 50, 2048, dataclasses.replace(cfg.ttt, grad_steps=2))
    assert two > 1.5 * one  # almost all of it is the adapted chunks' forward+backward
    assert one_chunk == phased_flops(cfg.model, [10] * 50, 2048, cfg.ttt)[0]  # a one-chunk document never adapts


def test_the_causality_audit_takes_a_presets_phased_settings():
    from pgolf.cli.audit import causality_parser
    from pgolf.cli.eval import ttt_config_from_args

    args = causality_parser().parse_args(["--artifact", "a", "--val", "v", "--tokenizer", "t", "--ttt", "phased",
                                           "--ttt-preset", "pr1855", "--ttt-set", "batch_docs=3"])
    cfg = ttt_config_from_args(args)
    assert cfg.mode == "phased" and cfg.doc_lora_rank == 80 and cfg.doc_beta2 == 0.99 and cfg.batch_docs == 3
