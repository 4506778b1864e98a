"""Hashed n-gram features, as DSIR defines them (Xie et al. 2023, "Data Selection for
Language Models via Importance Resampling", section 4).

A text is lower-cased and split by the word-punct rule (`\\w+|[^\\w\\s]+`: runs of word
characters, and runs of other non-space characters), the rule of NLTK's
`WordPunctTokenizer` that the reference package `data-selection` uses. Its n-grams are the
words, then every pair of neighbouring words joined by one space (and triples, for
`ngrams: 3`), each hashed into one shared space of `buckets` buckets.

The default hash reproduces the reference exactly: `int(sha256(s).hexdigest(), 16) %
buckets`, so `'alice'` lands in bucket 6720 of 10,000 and `'alice went'` in 114. sha256 is
the reference's main cost, yet real text repeats its n-grams: a memo of n-gram -> bucket
makes most lookups a dict hit, so each distinct n-gram is hashed about once per process.
`hash: crc32` is a faster hash for users who do not need the reference's buckets; it is
never used unless asked for.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Callable, Sequence

import numpy as np

WORD_PUNCT = re.compile(r"\w+|[^\w\s]+")
# The memo is cleared when it grows past this many n-grams (~100 MB), so memory stays bounded
# on any pool; clearing changes no result, only how often a hash is recomputed.
MEMO_LIMIT = 1 << 20


def word_punct(text: str) -> list[str]:
    """The lower-cased word-punct tokens of `text`."""
    return WORD_PUNCT.findall(text.lower())


def ngram_strings(words: Sequence[str], ngrams: int = 2) -> list[str]:
    """Unigrams, then bigrams (`'a b'`), then trigrams when `ngrams` is 3."""
    grams = list(words)
    for n in range(2, ngrams + 1):
        grams.extend(map(" ".join, zip(*(words[i:] for i in range(n)), strict=False)))
    return grams


def sha256_bucket(gram: str, buckets: int) -> int:
    """The reference package's bucket: `int(sha256(gram).hexdigest(), 16) % buckets`."""
    return int.from_bytes(hashlib.sha256(gram.encode("utf-8")).digest(), "big") % buckets


def crc32_bucket(gram: str, buckets: int) -> int:
    return zlib.crc32(gram.encode("utf-8")) % buckets


HASHES: dict[str, Callable[[str, int], int]] = {"sha256": sha256_bucket, "crc32": crc32_bucket}


def bucket_dtype(buckets: int) -> type:
    return np.uint16 if buckets <= 1 << 16 else np.uint32


class NgramHasher:
    """Turns texts into hashed n-gram ids, memoizing the bucket of every n-gram it has seen."""

    def __init__(self, *, buckets: int = 10_000, ngrams: int = 2, hash: str = "sha256"):
        self.buckets = buckets
        self.ngrams = ngrams
        self.dtype = bucket_dtype(buckets)
        self._hash = HASHES[hash]
        self._memo: dict[str, int] = {}
        # One shared int object per bucket keeps the memo's values from costing 28 bytes each.
        self._ints = list(range(buckets)) if buckets <= 1 << 20 else None

    def _bucket(self, gram: str) -> int:
        bucket = self._hash(gram, self.buckets)
        return self._ints[bucket] if self._ints is not None else bucket

    def ids(self, text: str) -> tuple[list[int], int]:
        """The buckets of one text's n-grams (unigrams first) and its number of words."""
        words = WORD_PUNCT.findall(text.lower())
        grams = words + list(map(" ".join, zip(words, words[1:], strict=False))) if self.ngrams == 2 \
            else ngram_strings(words, self.ngrams)
        memo = self._memo
        found = list(map(memo.get, grams))
        if None in found:
            if len(memo) > MEMO_LIMIT:
                memo.clear()
            for gram in set(grams).difference(memo):
                memo[gram] = self._bucket(gram)
            found = list(map(memo.__getitem__, grams))
        return found, len(words)

    def featurize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bucket ids of every text back to back, n-grams per text, words per text)."""
        flat: list[int] = []
        sizes = np.empty(len(texts), dtype=np.int64)
        words = np.empty(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            found, words[i] = self.ids(text)
            flat += found
            sizes[i] = len(found)
        return np.array(flat, dtype=self.dtype), sizes, words

    def counts(self, texts: Sequence[str]) -> np.ndarray:
        """The summed bag of hashed n-grams of `texts` (int64, one count per bucket)."""
        ids, _, _ = self.featurize(texts)
        return np.bincount(ids, minlength=self.buckets).astype(np.int64)

