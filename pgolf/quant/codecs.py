"""Byte compressors for artifact chunks.

Every codec is named in the artifact, so a file always decompresses with the codec that wrote it
(the submissions picked the decompressor from whatever was importable, so a zstd artifact could
not be read where ``zstandard`` was missing). A codec whose library is missing raises
``MissingDependencyError``: there is never a silent fallback to another compressor (the zlib
fallback cost real submissions 1.3-1.5 MB and pushed them over the cap).
"""

from __future__ import annotations

import io
import lzma
import zlib
from typing import TYPE_CHECKING, Callable

from pgolf.errors import ArtifactError, MissingDependencyError

if TYPE_CHECKING:
    from pgolf.quant.config import QuantConfig

# Stable ids stored in the container; never renumber.
CODEC_IDS = {"none": 0, "zlib-9": 1, "zstd-22": 2, "lzma": 3, "brotli": 4}
CODEC_NAMES: tuple[str, ...] = tuple(CODEC_IDS)
def _lzma_filters(raw_len: int) -> list[dict]:
    """Raw LZMA2, preset 9e, with the dictionary sized to the data (a power of two, 4 KiB..64 MiB).
    Both sides derive it from the uncompressed length (stored in the artifact), so no lzma header
    is stored, and a small chunk does not pay for allocating a 64 MiB dictionary (~0.2 s a call)."""
    dict_size = 1 << max(12, min(26, (max(raw_len, 1) - 1).bit_length()))
    return [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dict_size}]


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise MissingDependencyError(
            "codec zstd-22 needs the 'zstandard' package (pip install zstandard); refusing to fall back to another "
            "compressor, which would change the artifact size"
        ) from None
    return zstandard


def _brotli():
    try:
        import brotli
    except ImportError:
        raise MissingDependencyError("codec brotli needs the 'brotli' package (pip install brotli); no fallback") from None
    return brotli


def _brotli_decompress(data: bytes, raw_len: int) -> bytes:
    d = _brotli().Decompressor()
    try:
        return d.process(data, output_buffer_limit=raw_len + 1)  # brotli >= 1.2: bounded output
    except TypeError:  # brotli 1.1 has no output limit; the length is still checked afterwards
        return d.process(data)


def compress(codec: str, data: bytes) -> bytes:
    if codec == "none":
        return bytes(data)
    if codec == "zlib-9":
        return zlib.compress(data, 9)
    if codec == "zstd-22":
        return _zstd().ZstdCompressor(level=22).compress(data)
    if codec == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_lzma_filters(len(data)))
    if codec == "brotli":
        # window sized to the data (stored in the brotli stream itself), 64 KiB..16 MiB
        return _brotli().compress(data, quality=11, lgwin=max(16, min(24, (max(len(data), 1) - 1).bit_length())))
    raise ArtifactError(f"unknown codec {codec!r}; known: {', '.join(CODEC_NAMES)}")


def decompress(codec: str, data: bytes, raw_len: int) -> bytes:
    """Decompress and check the length recorded in the artifact (guards against bombs/corruption)."""
    try:
        if codec == "none":
            out = bytes(data)
        elif codec == "zlib-9":
            d = zlib.decompressobj()
            out = d.decompress(data, raw_len + 1)
        elif codec == "zstd-22":
            # a bounded streaming read: a frame's own content-size field is never trusted
            with _zstd().ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
                out = reader.read(raw_len + 1)
        elif codec == "lzma":
            out = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_lzma_filters(raw_len)).decompress(data, max_length=raw_len + 1)
        elif codec == "brotli":
            out = _brotli_decompress(data, raw_len)
        else:
            raise ArtifactError(f"unknown codec {codec!r} in artifact; known: {', '.join(CODEC_NAMES)}")
    except (zlib.error, lzma.LZMAError) as exc:
        raise ArtifactError(f"corrupt {codec} chunk: {exc}") from None
    except MissingDependencyError:
        raise
    except ArtifactError:
        raise
    except Exception as exc:  # zstd / brotli raise their own error classes
        raise ArtifactError(f"corrupt {codec} chunk: {exc}") from None
    if len(out) != raw_len:
        raise ArtifactError(f"{codec} chunk decompressed to {len(out)} bytes, artifact header says {raw_len}")
    return out


def require_codec(codec: str) -> None:
    """Fail now (MissingDependencyError) if ``codec`` (or, for ``auto``, any codec) cannot run
    here: a run checks this at start instead of finding out after training."""
    for name in CODEC_NAMES if codec == "auto" else (codec,):
        compress(name, b"x")


def require_export_libraries(qcfg: QuantConfig) -> None:
    """Fail at run start, not after training, if the codec or the entropy coder is missing."""
    require_codec(qcfg.codec)
    if qcfg.packing in ("entropy", "auto"):
        from pgolf.quant.entropy import _constriction

        _constriction()


def available_codecs() -> list[str]:
    """Codecs whose libraries import here."""
    out = []
    for name in CODEC_NAMES:
        try:
            compress(name, b"x")
            out.append(name)
        except MissingDependencyError:
            pass
    return out


CompressFn = Callable[[bytes], bytes]
