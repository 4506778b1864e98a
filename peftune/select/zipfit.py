"""ZIP-FIT: data selection by compression alignment (Obbad et al. 2024, "ZIP-FIT:
Embedding-Free Data Selection via Compression-Based Alignment").

A pool row x scores by its mean normalized compression distance to the target rows y_j:

    NCD(x, y) = (C(x + y) - min(C(x), C(y))) / max(C(x), C(y))
    score(x)  = 1 - mean_j NCD(x, y_j)

with `x + y` the plain concatenation of the UTF-8 bytes and C the compressed length; the k
highest scores are kept. Each target is compressed once; each pair costs one compression
of the concatenation, and nothing but one score per row is kept.

Compressors: `gzip` (the paper's; lengths byte-identical to `gzip.compress` at the same
level, which is a raw deflate stream plus an 18-byte header and trailer, so the header and
the CRC are not computed), `zlib`, and, when installed, `lz4` (frame format, the reference
package's default) and `zstd`. Level 0 of gzip/zlib stores the bytes uncompressed and is
refused by the recipe schema: every score would then measure only length.
"""

from __future__ import annotations

import importlib.util
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from peftune.errors import InputError

GZIP_FRAMING = 18  # gzip's 10-byte header and 8-byte trailer around the deflate stream
_PACKAGES = {"lz4": "lz4", "zstd": "zstandard"}


def compressor_available(name: str) -> bool:
    return name not in _PACKAGES or importlib.util.find_spec(_PACKAGES[name]) is not None


def compressed_size(name: str, level: int) -> Callable[[bytes], int]:
    """A function returning the compressed length of bytes under `name` at `level`."""
    if not compressor_available(name):
        raise InputError(f"select.compressor: {name} needs the {_PACKAGES[name]} package; "
                         f"pip install {_PACKAGES[name]}, or use compressor: gzip")
    if name == "gzip":
        compress = zlib.compress
        return lambda data: len(compress(data, level, -15)) + GZIP_FRAMING
    if name == "zlib":
        compress = zlib.compress
        return lambda data: len(compress(data, level))
    if name == "lz4":
        import lz4.frame

        compress = lz4.frame.compress
        return lambda data: len(compress(data, compression_level=level))
    if name == "zstd":
        import zstandard

        compress = zstandard.ZstdCompressor(level=level).compress
        return lambda data: len(compress(data))
    raise InputError(f"select.compressor: unknown compressor {name!r}; use gzip, zlib, lz4 "
                     "or zstd")


def ncd(c_x: int, c_y: int, c_xy: int) -> float:
    """Normalized compression distance from the three compressed lengths."""
    return (c_xy - min(c_x, c_y)) / max(c_x, c_y)


class ZipFitScorer:
    """Scores pool rows against a fixed target sample, compressing each target once."""

    def __init__(self, targets: Sequence[bytes], *, compressor: str = "gzip", level: int = 1):
        self.size = compressed_size(compressor, level)
        self.targets = list(targets)
        self.target_sizes = np.array([self.size(y) for y in self.targets], dtype=np.float64)

    def score(self, doc: bytes) -> float:
        size = self.size
        c_x = float(size(doc))
        c_xy = np.fromiter((size(doc + y) for y in self.targets), dtype=np.float64,
                           count=len(self.targets))
        distances = (c_xy - np.minimum(c_x, self.target_sizes)) \
            / np.maximum(c_x, self.target_sizes)
        return 1.0 - float(distances.mean())

    def scores(self, docs: Sequence[bytes]) -> np.ndarray:
        return np.fromiter((self.score(doc) for doc in docs), dtype=np.float64, count=len(docs))
