"""The official byte rule on hand-made token sequences, and exact float64 accumulation."""

from __future__ import annotations

import math

import pytest
import torch

from pgolf.eval.bpb import BPBAccumulator, EvalResult, build_byte_lut


@pytest.fixture(scope="module")
def sp(shared_tokenizer):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(shared_tokenizer))


@pytest.fixture(scope="module")
def demo_sp(demo_dir):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(demo_dir / "pgolf_1024_bpe.model"))


def _doc_bytes(sp, text: str) -> tuple[int, str]:
    """Bytes the rule assigns to the targets of [BOS] + encode(text), and the decoded text."""
    ids = [sp.bos_id()] + sp.encode(text)
    lut = build_byte_lut(sp, 1024)
    x, y = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
    return int(lut.target_bytes(x, y).sum()), sp.decode(ids[1:])


@pytest.mark.parametrize(
    "text",
    ["Hello world. The quick brown fox.", "über naïve café — 你好, Здравствуй 🙂", "  two  spaces and\nnewline", "a ▁ b", "1234567 + 89"],
)
def test_document_bytes_equal_utf8_length_of_the_decoded_text(sp, text):
    """Counting each target once with the rule gives exactly the UTF-8 size of the text (incl.
    byte-fallback pieces, leading spaces, no space after BOS)."""
    nbytes, decoded = _doc_bytes(sp, text)
    assert nbytes == len(decoded.encode("utf-8"))


def test_rule_on_hand_made_ids(sp):
    lut = build_byte_lut(sp, 1024)
    bos = sp.bos_id()
    space_piece = next(i for i in range(sp.vocab_size()) if sp.id_to_piece(i).startswith("\u2581") and len(sp.id_to_piece(i)) > 2)
    width = len(sp.id_to_piece(space_piece)[1:].encode())
    byte_piece = next(i for i in range(sp.vocab_size()) if sp.is_byte(i))
    # after BOS the leading space is not counted; after a normal token it is
    assert int(lut.target_bytes(torch.tensor([bos]), torch.tensor([space_piece]))) == width
    assert int(lut.target_bytes(torch.tensor([space_piece]), torch.tensor([space_piece]))) == width + 1
    # byte-fallback pieces are one byte each; control tokens are zero bytes and boundaries
    assert int(lut.target_bytes(torch.tensor([space_piece]), torch.tensor([byte_piece]))) == 1
    for ctrl in (sp.pad_id(), bos, sp.eos_id(), sp.unk_id()):
        assert int(lut.base_bytes[ctrl]) == 0 and bool(lut.is_boundary[ctrl])
    # ids beyond the tokenizer's vocab (a model vocab larger than the tokenizer's) are 0-byte boundaries
    big = build_byte_lut(sp, 1100)
    assert big.base_bytes.numel() == 1100 and int(big.base_bytes[1050]) == 0 and bool(big.is_boundary[1050])


def test_demo_tokenizer_also_satisfies_the_rule(demo_sp):
    nbytes, decoded = _doc_bytes(demo_sp, "Fellow-Citizens of the Senate: 1790, naïve.")
    assert nbytes == len(decoded.encode("utf-8"))


def test_accumulator_is_float64_and_exact():
    acc = BPBAccumulator("cpu")
    nll = torch.full((1000,), 1e-8, dtype=torch.float32)
    for _ in range(1000):
        acc.sums[0] += nll.to(torch.float64).sum()
    acc.add_sums(0.0, 1_000_000, 2_000_000)
    res = acc.result()
    assert acc.sums.dtype == torch.float64
    assert res.targets == 1_000_000 and res.bytes == 2_000_000
    assert res.val_loss == pytest.approx(1e-8, rel=1e-6)
    assert res.val_bpb == pytest.approx(1e-2 / (math.log(2) * 2_000_000), rel=1e-6)


def test_result_relation_between_loss_and_bpb():
    r = EvalResult.from_sums(nll_sum=1000.0, targets=500, nbytes=1200)
    assert r.val_loss == 2.0
    assert r.val_bpb == pytest.approx(r.val_loss / math.log(2) * 500 / 1200)
    with pytest.raises(ValueError):
        EvalResult.from_sums(0.0, 0, 0)
