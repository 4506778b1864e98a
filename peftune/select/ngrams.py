"""Hashed n-gram features, as DSIR defines them (Xie et al. 2023, "Data Selection for
Language Models via Importance Resampling", section 4).

A text is lower-cased and split by the word-punct rule (`\\w+|[^\\w\\s]+`: runs of word
characters, and runs of other non-space characters), the rule of NLTK's
`WordPunctTokenizer` that the reference package `data-selection` uses. Its n-grams are the
words, then every pair of neighbouring words joined by one space (and triples, for
`ngrams: 3`), each hashed into one shared space of `buckets` buckets.

The default hash reproduces the reference exactly: `int(sha256(s).hexdigest(), 16) %
buckets`, so `'alice'` lands in bucket 6720 of 10,000 and `'alice went'` in 114. sha256 is
the reference's main cost, yet real text repeats its n-grams, so each distinct n-gram is
hashed about once per process (see NgramHasher).
`hash: crc32` is a faster hash for users who do not need the reference's buckets; it is
never used unless asked for.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Callable, Sequence
from itertools import chain
from operator import methodcaller

import numpy as np

WORD_PUNCT = re.compile(r"\w+|[^\w\s]+")
# The tables are cleared when the vocabulary passes this many words (or the pair table 8x
# that), so memory stays bounded on any pool; clearing changes no result, only how often a
# hash is recomputed.
MEMO_LIMIT = 1 << 21


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
    return int.from_bytes(hashlib.sha256(gram.encode("utf-8", "surrogatepass")).digest(),
                          "big") % buckets


def crc32_bucket(gram: str, buckets: int) -> int:
    return zlib.crc32(gram.encode("utf-8", "surrogatepass")) % buckets


HASHES: dict[str, Callable[[str, int], int]] = {"sha256": sha256_bucket, "crc32": crc32_bucket}


def sha256_buckets(grams: list[str], buckets: int) -> np.ndarray:
    """`sha256_bucket` of many strings at once: the digests are computed by C-level maps and
    reduced modulo `buckets` in numpy, as four big-endian 64-bit limbs (Horner's rule)."""
    if not grams:
        return np.zeros(0, dtype=np.int64)
    digests = b"".join(map(methodcaller("digest"),
                           map(hashlib.sha256, map(methodcaller("encode", "utf-8", "surrogatepass"), grams))))
    limbs = np.frombuffer(digests, dtype=">u8").reshape(-1, 4).astype(np.uint64)
    if buckets > 1 << 32:
        return np.array([sha256_bucket(g, buckets) for g in grams], dtype=np.int64)
    base = np.uint64(pow(2, 64, buckets))
    modulus = np.uint64(buckets)
    rest = limbs[:, 0] % modulus
    for limb in range(1, 4):  # rest < 2**32 and base < 2**32, so the product fits
        rest = (rest * base + limbs[:, limb] % modulus) % modulus
    return rest.astype(np.int64)


def crc32_buckets(grams: list[str], buckets: int) -> np.ndarray:
    crcs = np.fromiter(map(zlib.crc32, map(methodcaller("encode", "utf-8", "surrogatepass"), grams)),
                       dtype=np.int64, count=len(grams))
    return crcs % buckets


MANY_HASHES: dict[str, Callable[[list[str], int], np.ndarray]] = {
    "sha256": sha256_buckets, "crc32": crc32_buckets}


def bucket_dtype(buckets: int) -> type:
    return np.uint16 if buckets <= 1 << 16 else np.uint32


class NgramHasher:
    """Turns texts into hashed n-gram ids, hashing each distinct n-gram about once.

    Unigrams and bigrams (the default) take a vectorised path: every word gets an integer
    id (one dict lookup per word), a bigram is the pair of ids packed in one int64, and the
    bigrams of a whole chunk of texts are looked up at once in a sorted table of the pairs
    seen so far (numpy `unique` + `searchsorted`); only pairs never seen before are joined
    into `'a b'` and hashed. Per token that is one dict lookup plus numpy work, instead of
    a string join and a lookup in a table of millions of strings. Trigrams (`ngrams: 3`)
    take a plain memo of n-gram string -> bucket.
    """

    def __init__(self, *, buckets: int = 10_000, ngrams: int = 2, hash: str = "sha256"):
        self.buckets = buckets
        self.ngrams = ngrams
        self.dtype = bucket_dtype(buckets)
        self._hash = HASHES[hash]
        self._hash_many = MANY_HASHES[hash]
        self._reset()

    def _reset(self) -> None:
        self._vocab: dict[str, int] = {}  # word -> id
        self._words: list[str] = []  # id -> word
        self._word_buckets = np.zeros(0, dtype=np.int64)  # id -> bucket
        self._pair_keys = np.zeros(0, dtype=np.int64)  # sorted packed (id, id) pairs
        self._pair_buckets = np.zeros(0, dtype=np.int64)
        self._new_keys = np.zeros(0, dtype=np.int64)  # recently added pairs, sorted
        self._new_buckets = np.zeros(0, dtype=np.int64)
        self._memo: dict[str, int] = {}  # trigram path only

    def featurize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bucket ids of every text back to back, each text's unigrams then its higher
        n-grams; n-grams per text; words per text)."""
        if len(self._vocab) > MEMO_LIMIT or len(self._pair_keys) > 8 * MEMO_LIMIT \
                or len(self._memo) > MEMO_LIMIT:
            self._reset()  # bounded memory; results do not change, only hashing work
        findall = WORD_PUNCT.findall
        per_text = [findall(text.lower()) for text in texts]
        words = np.fromiter(map(len, per_text), dtype=np.int64, count=len(per_text))
        if self.ngrams > 2:
            return self._featurize_memo(per_text, words)
        flat = list(chain.from_iterable(per_text))
        word_ids = self._word_ids(flat)
        unigrams = self._word_buckets[word_ids]
        if self.ngrams == 1 or len(flat) < 2:
            pairs = np.zeros(0, dtype=np.int64)
        else:
            inside = np.ones(len(flat) - 1, dtype=bool)  # pairs that do not cross texts
            ends = np.cumsum(words)[:-1]
            inside[ends[(ends > 0) & (ends < len(flat))] - 1] = False
            keys = (word_ids[:-1][inside] << 31) | word_ids[1:][inside]
            pairs = self._pair_buckets_of(keys)
        n_pairs = np.maximum(words - 1, 0) if self.ngrams == 2 else np.zeros_like(words)
        sizes = words + n_pairs
        # Lay each text's unigrams, then its bigrams, into its own segment.
        starts = np.cumsum(sizes) - sizes
        out = np.empty(int(sizes.sum()), dtype=self.dtype)
        out[_positions(starts, words)] = unigrams
        out[_positions(starts + words, n_pairs)] = pairs
        return out, sizes, words

    def _word_ids(self, flat: list[str]) -> np.ndarray:
        vocab = self._vocab
        try:  # most chunks bring no new word: straight into an array, no list in between
            return np.fromiter(map(vocab.__getitem__, flat), dtype=np.int64, count=len(flat))
        except KeyError:
            pass
        new = [w for w in dict.fromkeys(flat) if w not in vocab]
        start = len(self._words)
        vocab.update(zip(new, range(start, start + len(new)), strict=True))
        self._words += new
        self._word_buckets = np.concatenate([self._word_buckets,
                                             self._hash_many(new, self.buckets)])
        return np.fromiter(map(vocab.__getitem__, flat), dtype=np.int64, count=len(flat))

    def _pair_buckets_of(self, keys: np.ndarray) -> np.ndarray:
        """Buckets of packed word pairs. Known pairs live in a large sorted table plus a
        small sorted one that takes new pairs; the small one is merged into the large one
        when it reaches 1/8 of it, so inserting costs amortised O(1) copies per pair."""
        unique, inverse = np.unique(keys, return_inverse=True)
        buckets = np.full(len(unique), -1, dtype=np.int64)
        for table, values in ((self._pair_keys, self._pair_buckets),
                              (self._new_keys, self._new_buckets)):
            if len(table):
                at = np.minimum(np.searchsorted(table, unique), len(table) - 1)
                hit = table[at] == unique
                buckets[hit] = values[at[hit]]
        missing = np.flatnonzero(buckets < 0)
        if len(missing):
            pairs = unique[missing]
            word = self._words.__getitem__
            left = map(word, (pairs >> 31).tolist())
            right = map(word, (pairs & ((1 << 31) - 1)).tolist())
            fresh = self._hash_many(list(map(" ".join, zip(left, right, strict=True))),
                                    self.buckets)
            buckets[missing] = fresh
            where = np.searchsorted(self._new_keys, pairs)
            self._new_keys = np.insert(self._new_keys, where, pairs)
            self._new_buckets = np.insert(self._new_buckets, where, fresh)
            if len(self._new_keys) * 8 > len(self._pair_keys):
                merged = np.concatenate([self._pair_keys, self._new_keys])
                order = np.argsort(merged, kind="stable")
                self._pair_keys = merged[order]
                self._pair_buckets = np.concatenate([self._pair_buckets,
                                                     self._new_buckets])[order]
                self._new_keys = np.zeros(0, dtype=np.int64)
                self._new_buckets = np.zeros(0, dtype=np.int64)
        return buckets[inverse]

    def _featurize_memo(self, per_text: list[list[str]],
                        words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        memo = self._memo
        flat: list[int] = []
        sizes = np.empty(len(per_text), dtype=np.int64)
        for i, text_words in enumerate(per_text):
            grams = ngram_strings(text_words, self.ngrams)
            found = list(map(memo.get, grams))
            if None in found:
                for gram in set(grams).difference(memo):
                    memo[gram] = self._hash(gram, self.buckets)
                found = list(map(memo.__getitem__, grams))
            flat += found
            sizes[i] = len(found)
        return np.array(flat, dtype=self.dtype), sizes, words

    def ids(self, text: str) -> tuple[list[int], int]:
        """The buckets of one text's n-grams (unigrams first) and its number of words."""
        ids, _, words = self.featurize([text])
        return ids.tolist(), int(words[0])

    def counts(self, texts: Sequence[str]) -> np.ndarray:
        """The summed bag of hashed n-grams of `texts` (int64, one count per bucket)."""
        ids, _, _ = self.featurize(texts)
        return np.bincount(ids, minlength=self.buckets).astype(np.int64)


def _positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges [start, start + length) for each (start, length)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(total)
