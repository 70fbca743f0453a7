"""CaseOps (frontier.md 1.4): the transform, its inverse, the record's examples and ids, and the
per-token byte counts on real FineWeb text."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf.data import caseops
from pgolf.data.caseops import ALLCAPS, CAPNEXT, ESC, TITLE, CaseOpsError, decode, encode
from pgolf.data.tokenizer import challenge_normalizer, tokenizer_normalizer
from tests.conftest import SHARED_DATA

RECORD_TOKENIZER = SHARED_DATA / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
FINEWEB = SHARED_DATA / "fineweb" / "fineweb_sample10BT_2800docs.jsonl"


@pytest.fixture(scope="module")
def record_sp() -> spm.SentencePieceProcessor:
    if not RECORD_TOKENIZER.is_file():
        pytest.skip(f"the record's CaseOps tokenizer is not available at {RECORD_TOKENIZER} (../shared/data is absent)")
    return spm.SentencePieceProcessor(model_file=str(RECORD_TOKENIZER))


def test_record_examples() -> None:
    assert encode("The NASA Launch") == f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"
    assert encode("iPhone OpenAI") == f"i{CAPNEXT}phone {TITLE}open{CAPNEXT}a{CAPNEXT}i"
    assert decode(f"{TITLE}the {ALLCAPS}nasa {TITLE}launch") == "The NASA Launch"
    assert decode(f"i{CAPNEXT}phone {TITLE}open{CAPNEXT}a{CAPNEXT}i") == "iPhone OpenAI"


@pytest.mark.parametrize(
    "text, transformed",
    [
        ("a", "a"),
        ("A", TITLE + "a"),  # a one-letter uppercase word: TITLE, same output as the mixed rule
        ("AB", ALLCAPS + "ab"),
        ("Ab", TITLE + "ab"),
        ("aB", "a" + CAPNEXT + "b"),
        ("ABc", TITLE + "a" + CAPNEXT + "bc"),
        ("McDONALD", TITLE + "m" + "c" + "".join(CAPNEXT + c for c in "donald")),
        ("x2Y", "x2" + TITLE + "y"),  # digits end a letter run
        ("ÉCOLE", "É" + ALLCAPS + "cole"),  # only ASCII letters form runs
        (TITLE, ESC + TITLE),  # literal operator characters are escaped
        (ESC + ESC, ESC + ESC + ESC + ESC),
        ("a" + CAPNEXT + "B", "a" + ESC + CAPNEXT + TITLE + "b"),
        ("\ue000", "\ue000"),  # the v1 sentinel is not an operator: copied
    ],
)
def test_forward_rule_cases(text: str, transformed: str) -> None:
    assert encode(text) == transformed
    assert decode(transformed) == text


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("ab" + TITLE + "c", "TITLE at offset 2 is inside a word"),
        ("ab" + ALLCAPS + "cd", "ALLCAPS at offset 2 is inside a word"),
        (TITLE, "TITLE at offset 0 is not followed by a letter"),
        (TITLE + " x", "TITLE at offset 0 is not followed by a letter"),
        (ALLCAPS + "1", "ALLCAPS at offset 0 is not followed by a letter"),
        ("ab" + CAPNEXT, "dangling CAPNEXT"),
        ("ab" + CAPNEXT + " ", "dangling CAPNEXT"),
        (CAPNEXT + "a", "CAPNEXT at offset 0 is not inside a word"),
        (" " + CAPNEXT, "CAPNEXT at offset 1 is not inside a word"),
        (TITLE + CAPNEXT + "a", "CAPNEXT at offset 1 on a word's first letter"),
        ("a" + CAPNEXT + CAPNEXT + "b", "follows another CAPNEXT"),
        (ESC, "ESC at offset 0 is not followed by an operator"),
        (ESC + "a", "ESC at offset 0 is not followed by an operator"),
        ("Hello", "uppercase letter 'H' at offset 0"),
        (ALLCAPS + "a", "non-canonical"),
        (ALLCAPS + "a" + CAPNEXT + "b", "non-canonical"),
        (TITLE + "a" + CAPNEXT + "b", "canonical form is ALLCAPS"),
    ],
)
def test_malformed_operator_sequences_are_errors(bad: str, reason: str) -> None:
    with pytest.raises(CaseOpsError, match=reason):
        decode(bad)


letters_and_ops = st.text(alphabet=st.sampled_from(list("aAbBzZ 1é-") + list(caseops.OPERATORS) + ["\ue000"]), max_size=40)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=60), letters_and_ops))
def test_inverse_of_forward_is_identity_on_any_unicode(s: str) -> None:
    t = encode(s)
    assert decode(t) == s
    assert not any("A" <= c <= "Z" for c in t)  # the transformed text has lowercase ASCII only


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab A.") + list(caseops.OPERATORS)), max_size=30))
def test_every_string_decode_accepts_is_an_encode_output(t: str) -> None:
    """decode accepts only canonical strings: where it succeeds, encode gives ``t`` back (bijection)."""
    try:
        s = decode(t)
    except CaseOpsError:
        return
    assert encode(s) == t


def test_record_tokenizer_has_the_operators_at_ids_4_to_7(record_sp: spm.SentencePieceProcessor) -> None:
    caseops.check_operator_pieces(record_sp, "record")
    assert [record_sp.id_to_piece(i) for i in range(4, 8)] == [TITLE, ALLCAPS, CAPNEXT, ESC]
    pieces = record_sp.encode(encode("The NASA Launch"), out_type=str)
    # The space piece is separate from the marker (frontier.md 1.4).
    assert pieces[pieces.index("\u2581", 0):][:4] == ["\u2581", ALLCAPS, "nas", "a"]
    assert pieces[-4:] == ["\u2581", TITLE, "la", "unch"]
    with pytest.raises(Exception, match="not a CaseOps tokenizer"):
        caseops.check_operator_pieces(spm.SentencePieceProcessor(model_file=str(SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model")), "sp1024")


def test_byte_counts_of_escaped_operators(record_sp: spm.SentencePieceProcessor) -> None:
    table = caseops.piece_byte_table(record_sp)
    text = "Hi " + TITLE + ESC + " é"
    ids = np.array(record_sp.encode(encode(text)))
    counts = caseops.original_byte_counts(ids, table)
    assert int(counts.sum()) == len(text.encode("utf-8"))
    assert table[4:8].tolist() == [0, 0, 0, 0] and table[8] == 1 and table[1] == 0
    with pytest.raises(Exception, match="ESC not followed by an operator"):
        caseops.original_byte_counts(np.array([7, 300]), table)


def test_sidecar_bytes_of_real_fineweb_documents_equal_their_utf8_length(record_sp: spm.SentencePieceProcessor) -> None:
    """Every document of the FineWeb sample: the per-token original bytes sum to the UTF-8 length
    of the document as the tokenizer sees it (its nmt_nfkc + whitespace normalisation); the
    transform round-trips the raw text."""
    if not FINEWEB.is_file():
        pytest.skip(f"{FINEWEB} is absent")
    texts = [json.loads(line)["text"] for line in FINEWEB.open(encoding="utf-8")]
    normalize = tokenizer_normalizer(record_sp)
    assert normalize(texts[0]) == challenge_normalizer()(texts[0])
    table = caseops.piece_byte_table(record_sp)
    normalized = [normalize(t) for t in texts]
    encoded = record_sp.encode([encode(t) for t in normalized])
    for i, (text, ids) in enumerate(zip(normalized, encoded)):
        counts = caseops.original_byte_counts(np.array(ids), table)
        assert int(counts.sum()) == len(text.encode("utf-8")), f"document {i}"
    for text in texts[:300]:
        assert decode(encode(text)) == text
