"""Byte compressors for artifact chunks.

Every codec is named in the artifact, so a file always decompresses with the codec that wrote it
(the submissions picked the decompressor from whatever was importable, so a zstd artifact could
not be read where ``zstandard`` was missing). A codec whose library is missing raises
``MissingDependencyError``: there is never a silent fallback to another compressor (the zlib
fallback cost real submissions 1.3-1.5 MB and pushed them over the cap).
"""

from __future__ import annotations

import lzma
import zlib
from typing import Callable

from pgolf.errors import ArtifactError, MissingDependencyError

# Stable ids stored in the container; never renumber.
CODEC_IDS = {"none": 0, "zlib-9": 1, "zstd-22": 2, "lzma": 3, "brotli": 4}
CODEC_NAMES: tuple[str, ...] = tuple(CODEC_IDS)
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


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


def compress(codec: str, data: bytes) -> bytes:
    if codec == "none":
        return bytes(data)
    if codec == "zlib-9":
        return zlib.compress(data, 9)
    if codec == "zstd-22":
        return _zstd().ZstdCompressor(level=22).compress(data)
    if codec == "lzma":
        # Raw LZMA2 stream: the filter chain is fixed here, so no container header is stored.
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    if codec == "brotli":
        return _brotli().compress(data, quality=11, lgwin=24)
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
            out = _zstd().ZstdDecompressor().decompress(data, max_output_size=raw_len)
        elif codec == "lzma":
            out = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS).decompress(data, max_length=raw_len + 1)
        elif codec == "brotli":
            out = _brotli().decompress(data)
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
