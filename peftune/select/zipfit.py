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

lz4 pairs (`Lz4FrameLengths`): `lz4.frame.compress` spends about half of its time on a
pair of ~250 bytes setting up a fresh frame (a 16 KiB hash table cleared, the header).
What is compressed is the same as the blocks of one frame whose blocks are independent:
a pair is compressed as the next block of a frame kept open per process, so its length
is the block's length plus the frame header and end mark, with no set-up per pair. lz4
compresses an independent block exactly as on a cleared table (entries left by earlier
blocks are out of the block's window and never match), so the lengths are those of
`lz4.frame.compress`; inputs over one 64 KiB block, which `lz4.frame.compress` links,
take `lz4.frame.compress` itself. The scorer checks the identity on its targets first
and falls back to `lz4.frame.compress` if it does not hold (another lz4 build).
"""

from __future__ import annotations

import importlib.util
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from itertools import chain, repeat

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


class Lz4FrameLengths:
    """`len(lz4.frame.compress(data, compression_level=level))` of many inputs, each compressed
    as an independent block of one open lz4 frame (see the module's docstring)."""

    BLOCK = 1 << 16  # lz4.frame's default block size: longer inputs are linked blocks there
    FAST_LEVELS = 3  # lz4.frame levels below this use lz4's fast compressor, above it HC
    FRAMING = 19  # a header with the content size (15 bytes) and the end mark (4 bytes)

    def __init__(self, level: int):
        from lz4.frame import _frame

        self.level = level
        self._create = _frame.create_compression_context
        self._begin = _frame.compress_begin
        self._block = _frame.compress_chunk
        self._context = None
        self._pid = -1

    @classmethod
    def make(cls, level: int, probes: Sequence[bytes]) -> Lz4FrameLengths | None:
        """The fast path for `level`, or None when lz4 lacks it or it does not reproduce
        `lz4.frame.compress` on `probes` (non-empty inputs of at most one block)."""
        if level >= cls.FAST_LEVELS:
            return None
        import lz4.frame

        try:
            fast = cls(level)
            probes = [p for p in probes if 0 < len(p) <= cls.BLOCK]
            lengths = list(fast.lengths(probes))
        except (ImportError, AttributeError, TypeError, RuntimeError, ValueError):
            return None
        expected = [len(lz4.frame.compress(p, compression_level=level)) for p in probes]
        return fast if lengths == expected else None

    def _frame(self):
        """This process's open frame (a forked worker opens its own)."""
        if self._pid != os.getpid():
            context = self._create()
            self._begin(context, source_size=0, compression_level=self.level,
                        block_size=0, content_checksum=False, block_checksum=False,
                        block_linked=False, auto_flush=True)
            self._context, self._pid = context, os.getpid()
        return self._context

    def lengths(self, items: Iterable[bytes], count: int = -1) -> np.ndarray:
        """Frame lengths of non-empty inputs of at most `BLOCK` bytes (C-level maps)."""
        blocks = map(self._block, repeat(self._frame()), items)
        return np.fromiter(map(len, blocks), dtype=np.float64, count=count) + self.FRAMING

    def fits(self, size: int) -> bool:
        return 0 < size <= self.BLOCK


class ZipFitScorer:
    """Scores pool rows against a fixed target sample, compressing each target once."""

    def __init__(self, targets: Sequence[bytes], *, compressor: str = "gzip", level: int = 1):
        self.compress, self.framing = make_compressor(compressor, level)
        self.targets = list(targets)
        self.target_sizes = self._sizes(self.targets)
        self._longest = max(map(len, self.targets), default=0)
        self._lz4 = Lz4FrameLengths.make(level, self.targets[:64]) if compressor == "lz4" \
            else None

    def _sizes(self, items: Iterable[bytes], count: int = -1) -> np.ndarray:
        sizes = np.fromiter(map(len, map(self.compress, items)), dtype=np.float64, count=count)
        return sizes + self.framing

    def score(self, doc: bytes) -> float:
        return float(self.scores([doc])[0])

    def _pair_sizes(self, docs: Sequence[bytes]) -> np.ndarray:
        """C(x + y) of every row x and target y, (rows, targets): the concatenations are
        compressed by C-level maps, with no Python frame per pair."""
        compress, targets, n = self.compress, self.targets, len(self.targets)
        out = np.empty((len(docs), n))
        fast = self._lz4
        quick = np.zeros(len(docs), dtype=bool)
        if fast is not None:
            quick = np.fromiter((fast.fits(len(doc)) and len(doc) + self._longest <= fast.BLOCK
                                 for doc in docs), dtype=bool, count=len(docs))
        if quick.any() and n:
            pairs: Iterator[bytes] = chain.from_iterable(
                map(doc.__add__, targets) for doc, ok in zip(docs, quick, strict=True) if ok)
            out[quick] = fast.lengths(pairs, int(quick.sum()) * n).reshape(-1, n)
        if not quick.all():
            rest = [doc for doc, ok in zip(docs, quick, strict=True) if not ok]
            pairs_sizes = chain.from_iterable(map(len, map(compress, map(doc.__add__, targets)))
                                              for doc in rest)
            sizes = np.fromiter(pairs_sizes, dtype=np.float64, count=len(rest) * n)
            out[~quick] = sizes.reshape(len(rest), n) + self.framing
        return out

    def scores(self, docs: Sequence[bytes]) -> np.ndarray:
        """Scores of many rows: every distinct row is scored once, and its NCDs to the
        targets are computed as one array."""
        if not docs:
            return np.zeros(0)
        distinct = dict.fromkeys(docs)
        unique = list(distinct) if len(distinct) < len(docs) else list(docs)
        c_x = self._sizes(unique, len(unique))[:, None]
        c_xy = self._pair_sizes(unique)
        c_y = self.target_sizes[None, :]
        distances = (c_xy - np.minimum(c_x, c_y)) / np.maximum(c_x, c_y)
        scores = 1.0 - distances.mean(axis=1)
        if len(unique) == len(docs):
            return scores
        for i, doc in enumerate(unique):
            distinct[doc] = i
        return scores[np.fromiter(map(distinct.__getitem__, docs), dtype=np.int64,
                                  count=len(docs))]
