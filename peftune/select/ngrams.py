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
hashed about once per process (see NgramHasher), and the tokens of a whole chunk of texts
are found and looked up at once with numpy (`peftune.select.wordpunct`).
`hash: crc32` is a faster hash for users who do not need the reference's buckets; it is
never used unless asked for.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from peftune.select.hashtable import IntTable, distinct

try:  # CPython's own sha256 (3.12+: _sha2): on strings this short it is ~25% faster than
    # OpenSSL's through hashlib, whose per-call setup dominates; the digests are the same.
    from _sha2 import sha256 as _sha256
except ImportError:
    try:
        from _sha256 import sha256 as _sha256
    except ImportError:
        _sha256 = hashlib.sha256
from peftune.select.wordpunct import Vocabulary, WordPunct

WORD_PUNCT = re.compile(r"\w+|[^\w\s]+")
# The tables are cleared when the vocabulary passes this many words, or the pair table this
# many pairs (it then has about 2**23 slots of 16 bytes, 128 MiB), so memory stays bounded on
# any pool; clearing changes no result, only how often a hash is recomputed.
MEMO_LIMIT = 1 << 21
PAIR_LIMIT = 3 << 20
BATCH_CHARS = 1 << 18  # texts are featurized in batches of about this many characters


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


def sha256_buckets(grams: list[bytes], buckets: int) -> np.ndarray:
    """`sha256_bucket` of many UTF-8 strings at once: the digests are computed by C-level maps
    and reduced modulo `buckets` in numpy, as four big-endian 64-bit limbs (Horner's rule)."""
    if not grams:
        return np.zeros(0, dtype=np.int64)
    if buckets > 1 << 32:
        return np.array([int.from_bytes(hashlib.sha256(g).digest(), "big") % buckets
                         for g in grams], dtype=np.int64)
    digests = b"".join(map(_DIGEST, map(_sha256, grams)))
    limbs = np.frombuffer(digests, dtype=">u8").reshape(-1, 4).astype(np.uint64)
    base = np.uint64(pow(2, 64, buckets))
    modulus = np.uint64(buckets)
    rest = limbs[:, 0] % modulus
    for limb in range(1, 4):  # rest < 2**32 and base < 2**32, so the product fits
        rest = (rest * base + limbs[:, limb] % modulus) % modulus
    return rest.astype(np.int64)


def crc32_buckets(grams: list[bytes], buckets: int) -> np.ndarray:
    crcs = np.fromiter(map(zlib.crc32, grams), dtype=np.int64, count=len(grams))
    return crcs % buckets


_DIGEST = type(_sha256(b"")).digest
MANY_HASHES: dict[str, Callable[[list[bytes], int], np.ndarray]] = {
    "sha256": sha256_buckets, "crc32": crc32_buckets}


def bucket_dtype(buckets: int) -> type:
    return np.uint16 if buckets <= 1 << 16 else np.uint32


class NgramHasher:
    """Turns texts into hashed n-gram ids, hashing each distinct n-gram about once.

    Unigrams and bigrams (the default) take a vectorised path: the tokens of a whole chunk
    of texts are found at once and get word ids (`peftune.select.wordpunct`); a bigram is
    the pair of ids packed in one uint64, and the bigrams of the chunk are looked up at once
    in a table of the pairs seen so far (`IntTable`); only pairs never seen before are joined
    into `'a b'` and hashed. Per token that is a few numpy passes, with no Python object per
    token. Trigrams (`ngrams: 3`) take a plain memo of n-gram string -> bucket.
    """

    def __init__(self, *, buckets: int = 10_000, ngrams: int = 2, hash: str = "sha256"):
        self.buckets = buckets
        self.ngrams = ngrams
        self.dtype = bucket_dtype(buckets)
        self._hash = HASHES[hash]
        self._hash_many = MANY_HASHES[hash]
        self._splitter = WordPunct()
        self._reset()

    def _reset(self) -> None:
        self._vocab = Vocabulary(self._hash_many, self.buckets)
        self._pairs = IntTable(20)  # packed (id, id) + 1 -> bucket
        self._memo: dict[str, int] = {}  # trigram path only

    def featurize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bucket ids of every text back to back, each text's unigrams then its higher
        n-grams; n-grams per text; words per text)."""
        if len(self._vocab) > MEMO_LIMIT or len(self._pairs) > PAIR_LIMIT \
                or len(self._memo) > MEMO_LIMIT:
            self._reset()  # bounded memory; results do not change, only hashing work
        if self.ngrams > 2:
            per_text = [WORD_PUNCT.findall(text.lower()) for text in texts]
            words = np.fromiter(map(len, per_text), dtype=np.int64, count=len(per_text))
            return self._featurize_memo(per_text, words)
        lengths = np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)))
        if len(texts) > 1 and lengths[-1] > BATCH_CHARS:
            # Long texts: a few batches whose arrays stay in cache; each text's features
            # are its own, so the batches change nothing.
            cuts = np.unique(np.searchsorted(lengths, np.arange(BATCH_CHARS, lengths[-1],
                                                                BATCH_CHARS)))
            parts = [self._featurize_pairs(texts[a:b])
                     for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(texts)],
                                     strict=True) if b > a]
            return tuple(np.concatenate(arrays) for arrays in zip(*parts, strict=True))
        return self._featurize_pairs(texts)

    def _featurize_pairs(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray,
                                                               np.ndarray]:
        tokens = self._splitter.tokens(texts)
        words = tokens.words
        word_ids = self._vocab.ids(tokens)
        unigrams = self._vocab.buckets[word_ids]
        if self.ngrams == 1 or len(word_ids) < 2:
            pairs = np.zeros(0, dtype=np.int64)
        else:
            inside = np.ones(len(word_ids) - 1, dtype=bool)  # pairs that do not cross texts
            ends = np.cumsum(words)[:-1]
            inside[ends[(ends > 0) & (ends < len(word_ids))] - 1] = False
            keys = (word_ids[:-1][inside] << 32 | word_ids[1:][inside]) + 1
            pairs = self._pair_buckets(keys.view(np.uint64))
        n_pairs = np.maximum(words - 1, 0) if self.ngrams == 2 else np.zeros_like(words)
        sizes = words + n_pairs
        # Lay each text's unigrams, then its bigrams, into its own segment.
        starts = np.cumsum(sizes) - sizes
        out = np.empty(int(sizes.sum()), dtype=self.dtype)
        out[segment_positions(starts, words)] = unigrams
        out[segment_positions(starts + words, n_pairs)] = pairs
        return out, sizes, words

    def _pair_buckets(self, keys: np.ndarray) -> np.ndarray:
        """Buckets of packed word pairs; pairs not seen before are joined and hashed."""
        found, slots = self._pairs.find(keys)
        missing = found < 0
        if missing.any():
            new, first, inverse = distinct(keys[missing])
            pairs = new - np.uint64(1)
            word = self._vocab.words.__getitem__
            left = map(word, (pairs >> np.uint64(32)).tolist())
            right = map(word, (pairs & np.uint64(0xFFFFFFFF)).tolist())
            fresh = self._hash_many(list(map(b" ".join, zip(left, right, strict=True))),
                                    self.buckets)
            self._pairs.add(new, fresh, slots[missing][first])
            found[missing] = fresh[inverse]
        return found

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


def segment_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges [start, start + length) for each (start, length)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(total)
