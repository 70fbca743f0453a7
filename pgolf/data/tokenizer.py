"""SentencePiece tokenizers: load one with clear errors, or train one with the challenge's settings.

The challenge's tokenizer (``fineweb_1024_bpe.model``) is a SentencePiece BPE model trained with the
settings in :data:`CHALLENGE_TRAINER_SETTINGS`; every other trainer field is SentencePiece's
default. :func:`train_tokenizer` reproduces those settings so that a tokenizer trained on other
text (the demo corpus, a custom data set) encodes and counts bytes the same way.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from pgolf.errors import DataError

#: Trainer settings of the official ``fineweb_1024_bpe.model`` (read from its trainer_spec), minus
#: ``vocab_size`` which is a parameter. ``add_dummy_prefix`` and ``remove_extra_whitespaces`` are
#: normalizer settings; SentencePiece accepts them as trainer arguments.
CHALLENGE_TRAINER_SETTINGS: dict[str, object] = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "split_digits": True,
    "hard_vocab_limit": False,
    "byte_fallback": True,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "remove_extra_whitespaces": True,
}

#: Default cap on the characters fed to the trainer. Training is fast (about 1.6 s for 19 MB of
#: FineWeb text on 2 cores) but its memory grows with the input; 50M characters (about 21M tokens)
#: is far more text than a 1024-piece BPE needs for stable merges.
DEFAULT_MAX_TRAIN_CHARS = 50_000_000

#: SentencePiece skips, silently, every training sentence longer than ``max_sentence_length``
#: bytes (default 4192). We feed whole documents (see :func:`train_tokenizer`) and more than half of
#: FineWeb's documents are longer than that, so the limit is raised far above any real document.
_MAX_SENTENCE_BYTES = 1 << 28


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (shards can be hundreds of MB)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror})") from None
    return digest.hexdigest()


def load_tokenizer(path: str | Path, expected_vocab: int | None = None) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model, checking that it exists, parses, and has ``expected_vocab`` pieces."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"tokenizer {path} does not exist; pass the .model file the shards were made with "
            "(data.tokenizer) or prepare the data folder with `pgolf data prepare`"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"tokenizer {path}: cannot read it ({exc.strerror})") from None
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except (RuntimeError, OSError, ValueError):
        raise DataError(
            f"tokenizer {path} is not a SentencePiece model; point data.tokenizer at a .model file "
            "(for example fineweb_1024_bpe.model)"
        ) from None
    n = int(sp.vocab_size())
    if expected_vocab is not None and n != expected_vocab:
        raise DataError(
            f"tokenizer {path} has {n} pieces but model.vocab_size is {expected_vocab}: point --data at "
            f"sp{expected_vocab} shards (`pgolf data fetch --variant sp{expected_vocab}`, or `pgolf data prepare "
            f"--train-tokenizer --vocab-size {expected_vocab}` on your documents), or set model.vocab_size={n}"
        )
    return sp


def _documents_for_training(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Yield whole documents until ``max_chars`` characters have been fed (deterministic cap).

    Each document is fed whole as one "sentence" rather than split into lines or paragraphs. The
    nmt_nfkc normalizer with remove_extra_whitespaces turns newlines into single spaces when encoding,
    so a line-initial word is encoded as "▁word" (the newline became its space). Splitting documents
    at newlines would train on "word" at line starts instead, unlike what encoding sees. Empty
    documents carry no text and are skipped.
    """
    fed = 0
    for text in texts:
        if fed >= max_chars:
            return
        if not text.strip():
            continue
        take = text[: max_chars - fed]
        fed += len(take)
        yield take


def challenge_normalizer():
    """The text normalisation of :data:`CHALLENGE_TRAINER_SETTINGS` (nmt_nfkc, whitespace runs
    collapsed, no leading/trailing space, no dummy prefix) as a function str -> str, spaces kept
    as spaces: what a tokenizer trained with those settings sees of a document."""
    normalizer = spm.SentencePieceNormalizer(
        rule_name=str(CHALLENGE_TRAINER_SETTINGS["normalization_rule_name"]),
        add_dummy_prefix=bool(CHALLENGE_TRAINER_SETTINGS["add_dummy_prefix"]),
        remove_extra_whitespaces=bool(CHALLENGE_TRAINER_SETTINGS["remove_extra_whitespaces"]),
        escape_whitespaces=False,
    )
    return normalizer.normalize


def tokenizer_normalizer(sp: spm.SentencePieceProcessor):
    """The normalisation of a loaded tokenizer as a function str -> str, with spaces (its "▁"
    escapes, and any literal U+2581, which it cannot tell apart) as spaces."""
    return lambda text: sp.normalize(text).replace("\u2581", " ")


def check_vocab_size(vocab_size: int) -> None:
    """DataError unless a trained tokenizer of ``vocab_size`` pieces can exist and fit uint16 shards."""
    if vocab_size < 260:
        # 4 special pieces + 256 byte-fallback pieces come before any learned piece.
        raise DataError(f"vocab_size {vocab_size} is too small for byte fallback: it needs at least 260 pieces")
    if vocab_size > 65536:
        raise DataError(f"vocab_size {vocab_size} does not fit the shards' uint16 token ids (max 65536)")


def train_tokenizer(
    texts: Iterable[str],
    out_path: str | Path,
    vocab_size: int = 1024,
    *,
    max_chars: int = DEFAULT_MAX_TRAIN_CHARS,
    user_defined_symbols: list[str] | None = None,
) -> Path:
    """Train a SentencePiece BPE tokenizer with the challenge's settings and write it atomically.

    ``texts`` are whole documents. At most ``max_chars`` characters are used: the documents are
    taken in order and the last one is cut, so the result depends only on the input: training is
    deterministic, and the model file is byte-identical across machines because ``num_threads`` is
    left at its default (it is recorded in the model's trainer_spec, though it does not change the
    pieces). Raises
    :class:`DataError` if the text is too small to learn ``vocab_size`` pieces: with
    ``hard_vocab_limit=False`` SentencePiece would otherwise return a smaller vocabulary silently.
    ``user_defined_symbols`` become pieces 4, 5, ... right after pad/bos/eos/unk (CaseOps puts its
    four operators there) and are never merged with other text.
    """
    out_path = Path(out_path)
    check_vocab_size(vocab_size)
    writer = io.BytesIO()
    documents = _documents_for_training(texts, max_chars)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=documents,
            model_writer=writer,
            vocab_size=vocab_size,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            minloglevel=2,  # SentencePiece logs every step at INFO level to stderr otherwise
            **({"user_defined_symbols": list(user_defined_symbols)} if user_defined_symbols else {}),
            **CHALLENGE_TRAINER_SETTINGS,
        )
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"cannot train a tokenizer for {out_path}: {first}; check the training documents and --vocab-size"
        ) from None
    model = writer.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=model)
    if sp.vocab_size() != vocab_size:
        raise DataError(
            f"cannot train a {vocab_size}-piece tokenizer for {out_path}: the training text only supports "
            f"{sp.vocab_size()} pieces; give more training documents or a smaller --vocab-size"
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, model)
    return out_path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
