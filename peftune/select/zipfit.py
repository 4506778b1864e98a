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
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from itertools import chain

import numpy as np

from peftune.errors import InputError

GZIP_FRAMING = 18  # gzip's 10-byte header and 8-byte trailer around the deflate stream
_PACKAGES = {"lz4": "lz4", "zstd": "zstandard"}


def compressor_available(name: str) -> bool:
    return name not in _PACKAGES or importlib.util.find_spec(_PACKAGES[name]) is not None


def make_compressor(name: str, level: int) -> tuple[Callable[[bytes], bytes], int]:
    """`(compress, framing)`: a one-argument compress function (a C callable, so it can run
    under `map` without Python frames) and the bytes to add to its output's length."""
    if not compressor_available(name):
        raise InputError(f"select.compressor: {name} needs the {_PACKAGES[name]} package; "
                         f"pip install {_PACKAGES[name]}, or use compressor: gzip")
    if name == "gzip":
        return partial(zlib.compress, level=level, wbits=-15), GZIP_FRAMING
    if name == "zlib":
        return partial(zlib.compress, level=level), 0
    if name == "lz4":
        import lz4.frame

        # Level 0 is lz4.frame's default: calling it without keywords saves ~15% per pair.
        if level == 0:
            return lz4.frame.compress, 0
        return partial(lz4.frame.compress, compression_level=level), 0
    if name == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=level).compress, 0
    raise InputError(f"select.compressor: unknown compressor {name!r}; use gzip, zlib, lz4 "
                     "or zstd")


def compressed_size(name: str, level: int) -> Callable[[bytes], int]:
    """A function returning the compressed length of bytes under `name` at `level`."""
    compress, framing = make_compressor(name, level)
    return lambda data: len(compress(data)) + framing


def ncd(c_x: int, c_y: int, c_xy: int) -> float:
    """Normalized compression distance from the three compressed lengths."""
    return (c_xy - min(c_x, c_y)) / max(c_x, c_y)


class ZipFitScorer:
    """Scores pool rows against a fixed target sample, compressing each target once."""

    def __init__(self, targets: Sequence[bytes], *, compressor: str = "gzip", level: int = 1):
        self.compress, self.framing = make_compressor(compressor, level)
        self.targets = list(targets)
        self.target_sizes = self._sizes(self.targets)

    def _sizes(self, items: Iterable[bytes], count: int = -1) -> np.ndarray:
        sizes = np.fromiter(map(len, map(self.compress, items)), dtype=np.float64, count=count)
        return sizes + self.framing

    def score(self, doc: bytes) -> float:
        return float(self.scores([doc])[0])

    def scores(self, docs: Sequence[bytes]) -> np.ndarray:
        """Scores of many rows: the row x target concatenations are compressed by C-level
        maps (no Python frame per pair), then the NCDs are computed as one array."""
        if not docs:
            return np.zeros(0)
        compress, targets = self.compress, self.targets
        c_x = self._sizes(docs, len(docs))[:, None]
        pairs = chain.from_iterable(map(len, map(compress, map(doc.__add__, targets)))
                                    for doc in docs)
        c_xy = np.fromiter(pairs, dtype=np.float64, count=len(docs) * len(targets))
        c_xy = c_xy.reshape(len(docs), len(targets)) + self.framing
        c_y = self.target_sizes[None, :]
        distances = (c_xy - np.minimum(c_x, c_y)) / np.maximum(c_x, c_y)
        return 1.0 - distances.mean(axis=1)
