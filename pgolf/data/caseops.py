"""CaseOps (``lossless_caps_caseops_v1``, frontier.md 1.4): a bijective text transform that moves
the case of ASCII words into four operator characters, so a tokenizer sees lowercase words only.

Operators (Unicode private use; the record's tokenizer has them as pieces 4-7):

    TITLE U+E001 (id 4)   ALLCAPS U+E002 (id 5)   CAPNEXT U+E003 (id 6)   ESC U+E004 (id 7)

Forward rule (:func:`encode`), on maximal runs ``w`` of ASCII letters [A-Za-z]:

* all lowercase: ``w`` unchanged;
* ``len(w) >= 2`` and all uppercase: ALLCAPS + lower(w);
* first letter upper, the rest lowercase: TITLE + lower(w) (a one-letter uppercase word too);
* otherwise (mixed case): [TITLE if the first letter is upper] + lower(first letter), then every
  later letter as [CAPNEXT if it was upper] + its lowercase.

A literal operator character in the text is written as ESC + itself; every other character is
copied. Examples: "The NASA Launch" -> TITLE "the " ALLCAPS "nasa " TITLE "launch";
"iPhone OpenAI" -> "i" CAPNEXT "phone " TITLE "open" CAPNEXT "a" CAPNEXT "i".

:func:`decode` is the exact inverse and accepts only what :func:`encode` can produce, so the two
are a bijection between all strings and all valid transformed strings. It raises
:class:`CaseOpsError` (naming the offset) on a marker inside a word, a dangling marker, a marker not
followed by a letter, an ESC not followed by an operator character, an uppercase ASCII letter, and
on the non-canonical forms (ALLCAPS on one letter, CAPNEXT inside an ALLCAPS word or on a word's
first letter, TITLE + CAPNEXT on every later letter, which is ALLCAPS).

Byte accounting (:func:`piece_byte_table`, :func:`original_byte_counts`): a token stands for the
UTF-8 bytes of the original text it decodes to. Operators are worth 0, an operator character
that an ESC escaped is worth its own UTF-8 length (3), every other character its UTF-8 length (a
letter 1, the space piece "▁" 1); BOS and the other control pieces 0.
"""

from __future__ import annotations

import re

import numpy as np

from pgolf.errors import DataError

TITLE = "\ue001"
ALLCAPS = "\ue002"
CAPNEXT = "\ue003"
ESC = "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
#: The record tokenizer's ids of the operators (frontier.md 1.4), used as user-defined symbols.
OPERATOR_IDS = {TITLE: 4, ALLCAPS: 5, CAPNEXT: 6, ESC: 7}
TRANSFORM_NAME = "lossless_caps_caseops_v1"

_WORD_OR_OP = re.compile(r"(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*|[\ue001-\ue004]")
_PLAIN = re.compile(r"[^A-Za-z\ue001-\ue004]+")
_SIMPLE_WORD = re.compile(r"([\ue001\ue002]?)([a-z]+)(?![a-zA-Z\ue003])")


class CaseOpsError(DataError):
    """A string that no :func:`encode` output equals (the message names the offset and why)."""


def _encode_match(m: re.Match[str]) -> str:
    w = m.group(0)
    if w in OPERATORS:
        return ESC + w
    # Only runs with at least one uppercase letter reach here (all-lowercase runs are not matched).
    if len(w) >= 2 and w.isupper():
        return ALLCAPS + w.lower()
    head = TITLE + w[0].lower() if w[0].isupper() else w[0]
    if w[1:].islower() or len(w) == 1:
        return head + w[1:]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in w[1:])


def encode(text: str) -> str:
    """The CaseOps transform of ``text`` (see the module docstring)."""
    return _WORD_OR_OP.sub(_encode_match, text)


def _is_lower(c: str) -> bool:
    return "a" <= c <= "z"


def decode(text: str) -> str:
    """The inverse of :func:`encode`; :class:`CaseOpsError` on any string it cannot have produced."""
    out: list[str] = []
    n, i = len(text), 0
    while i < n:
        m = _PLAIN.match(text, i)
        if m:  # fast path: a stretch with no letter and no operator
            out.append(m.group(0))
            i = m.end()
            continue
        m = _SIMPLE_WORD.match(text, i)
        if m and (not m.group(1) or i == 0 or not _is_lower(text[i - 1])):
            mark, word = m.group(1), m.group(2)
            if mark == ALLCAPS and len(word) >= 2:  # fast path: the three canonical one-marker words
                out.append(word.upper())
                i = m.end()
                continue
            if mark != ALLCAPS:
                out.append(word[0].upper() + word[1:] if mark == TITLE else word)
                i = m.end()
                continue
        c = text[i]
        if c == ESC:
            if i + 1 >= n or text[i + 1] not in OPERATORS:
                raise CaseOpsError(f"CaseOps: ESC at offset {i} is not followed by an operator character")
            out.append(text[i + 1])
            i += 2
        elif c in (TITLE, ALLCAPS) or _is_lower(c):
            i = _decode_word(text, i, out)
        elif c == CAPNEXT:
            raise CaseOpsError(f"CaseOps: CAPNEXT at offset {i} is not inside a word")
        elif "A" <= c <= "Z":
            raise CaseOpsError(f"CaseOps: uppercase letter {c!r} at offset {i} (transformed text is lowercase)")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _decode_word(text: str, i: int, out: list[str]) -> int:
    """Decode the word starting at ``i`` (an optional TITLE/ALLCAPS, then letters and CAPNEXTs)."""
    start = i
    mode = text[i] if text[i] in (TITLE, ALLCAPS) else ""
    if mode:
        if i > 0 and _is_lower(text[i - 1]):
            name = "TITLE" if mode == TITLE else "ALLCAPS"
            raise CaseOpsError(f"CaseOps: {name} at offset {i} is inside a word")
        i += 1
    letters: list[str] = []
    caps: list[bool] = []
    pending = False
    n = len(text)
    while i < n:
        c = text[i]
        if _is_lower(c):
            letters.append(c)
            caps.append(pending)
            pending = False
        elif c == CAPNEXT:
            if not letters:
                raise CaseOpsError(f"CaseOps: CAPNEXT at offset {i} on a word's first letter (non-canonical)")
            if pending:
                raise CaseOpsError(f"CaseOps: CAPNEXT at offset {i} follows another CAPNEXT")
            pending = True
        elif "A" <= c <= "Z":
            raise CaseOpsError(f"CaseOps: uppercase letter {c!r} at offset {i} (transformed text is lowercase)")
        else:
            break
        i += 1
    if pending:
        raise CaseOpsError(f"CaseOps: dangling CAPNEXT before offset {i} (not followed by a letter)")
    if not letters:
        name = "TITLE" if mode == TITLE else "ALLCAPS"
        raise CaseOpsError(f"CaseOps: {name} at offset {start} is not followed by a letter")
    if mode == ALLCAPS:
        if any(caps) or len(letters) < 2:
            raise CaseOpsError(f"CaseOps: ALLCAPS word at offset {start} is non-canonical (needs 2+ letters, no CAPNEXT)")
        out.append("".join(letters).upper())
        return i
    if mode == TITLE and len(letters) >= 2 and all(caps[1:]):
        raise CaseOpsError(f"CaseOps: TITLE word at offset {start} has every letter uppercase (canonical form is ALLCAPS)")
    first = letters[0].upper() if mode == TITLE else letters[0]
    out.append(first + "".join(c.upper() if up else c for c, up in zip(letters[1:], caps[1:])))
    return i


# ------------------------------------------------------------------------------------------------
# tokenizer side: operator pieces and per-token original bytes


def check_operator_pieces(sp, where: str) -> None:
    """DataError unless the SentencePiece model has the four operators as pieces 4-7."""
    for op, idx in OPERATOR_IDS.items():
        if idx >= sp.vocab_size() or sp.id_to_piece(idx) != op:
            raise DataError(
                f"tokenizer {where} is not a CaseOps tokenizer: piece {idx} should be U+{ord(op):04X}; "
                "train one with `pgolf data prepare --train-tokenizer --caseops`"
            )


def piece_byte_table(sp) -> np.ndarray:
    """Original UTF-8 bytes of every piece, unescaped (int32 [vocab]): control/unknown 0, byte
    pieces 1, operators 0, other pieces the UTF-8 length of their text with "▁" as a space."""
    n = int(sp.vocab_size())
    table = np.zeros(n, dtype=np.int32)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        if sp.is_byte(i):
            table[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece in OPERATORS:
            continue
        if any(op in piece for op in OPERATORS):
            raise DataError(f"piece {i} {piece!r} mixes a CaseOps operator with text; the operators must be user-defined symbols")
        table[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return table


def original_byte_counts(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Per-token original bytes of a token sequence (int32, same length as ``ids``).

    ``table`` from :func:`piece_byte_table`. The only context is ESC: the operator piece right
    after an unescaped ESC is a literal operator character and is worth 3 bytes."""
    ids = np.asarray(ids)
    counts = table[ids].astype(np.int32)
    esc_id, op_ids = OPERATOR_IDS[ESC], set(OPERATOR_IDS.values())
    positions = np.flatnonzero(ids == esc_id)
    skip_until = -1
    for p in positions.tolist():
        if p <= skip_until:
            continue  # this ESC is itself an escaped literal
        if p + 1 >= ids.size or int(ids[p + 1]) not in op_ids:
            raise DataError(f"token {p} is a CaseOps ESC not followed by an operator piece; the tokens are not CaseOps output")
        counts[p + 1] = len(ESC.encode("utf-8"))
        skip_until = p + 1
    return counts
