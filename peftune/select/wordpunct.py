"""Word-punct tokens of many texts at once, and their word ids, with numpy.

DSIR's features start from `re.findall(r"\\w+|[^\\w\\s]+", text.lower())`: the maximal runs
of word characters (Python's `\\w`: `str.isalnum()` or `_`) and the maximal runs of other
non-space characters (`str.isspace()` is `\\s`). Calling the regex per text costs more than
all the rest of featurizing a short text, so a chunk of texts is tokenised in one go: the
lower-cased texts are joined by spaces into one string, every code point gets its class
(space, word, other) from a table, and a token is a run of one class other than space, so
tokens start and end where the class changes. That is the regex's own rule, hence the same
tokens (a test checks every code point's class against the regex, and real text).

Word ids: a token of at most 8 ASCII characters is its own 64-bit key (its bytes and its
length), one of 9 to 16 its own two words, so the tokens of a chunk are looked up at once in
an `IntTable`; longer tokens and tokens with other characters (about one in a hundred in
English text or code) are sliced out as strings and looked up in a dict. Only words never
seen before are hashed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from peftune.select.hashtable import IntTable, distinct

SPACE, WORD, OTHER = 0, 1, 2
_UNKNOWN = 255
NOT_ASCII = 128
SHORT = 8  # tokens of up to this many ASCII characters are keyed by their bytes
# A short token's key: its bytes (the low `length` bytes) with a tag that makes the key
# unique and non-zero: lengths 0-7 set byte 7 to 0x80 | length; length 8 uses all 8 bytes,
# whose top bits ASCII leaves free, and sets the top bit of byte 0.
_MASKS = np.array([(1 << 8 * n) - 1 for n in range(SHORT)] + [(1 << 64) - 1], dtype=np.uint64)
_TAGS = np.array([(0x80 | n) << 56 for n in range(SHORT)] + [0x80], dtype=np.uint64)


def char_class(char: str) -> int:
    """The class of one character in the word-punct rule: `\\w`, `\\s`, or neither."""
    if char.isalnum() or char == "_":
        return WORD
    return SPACE if char.isspace() else OTHER


@dataclass
class Tokens:
    """The tokens of some texts: spans of `text`, the lower-cased texts joined by spaces."""

    text: str
    starts: np.ndarray  # code point offsets into `text`
    ends: np.ndarray
    words: np.ndarray  # tokens per text
    chars: np.ndarray  # `text` as bytes (NOT_ASCII for other code points), 8 zeros after
    ascii: np.ndarray | None  # per token: all ASCII; None when the whole text is

    def __len__(self) -> int:
        return len(self.starts)

    def strings(self, which: np.ndarray) -> list[str]:
        text = self.text
        return [text[a:b] for a, b in zip(self.starts[which].tolist(),
                                          self.ends[which].tolist(), strict=True)]


class WordPunct:
    """Finds the word-punct tokens of many texts at once."""

    def __init__(self) -> None:
        # Class of every code point, filled in for the non-ASCII ones when they first occur;
        # ASCII bytes have a translation table of their own, where NOT_ASCII stands for the
        # other code points.
        self._classes = np.full(0x110000, _UNKNOWN, dtype=np.uint8)
        self._classes[:128] = [char_class(chr(c)) for c in range(128)]
        self._ascii = bytes(self._classes[:NOT_ASCII + 1]) + bytes(255 - NOT_ASCII)

    def tokens(self, texts: Sequence[str]) -> Tokens:
        lowered = list(map(str.lower, texts))
        lengths = np.fromiter(map(len, lowered), dtype=np.int64, count=len(lowered))
        text = " ".join(lowered)
        wide_at = None
        if text.isascii():
            data = text.encode("ascii")
            codes = np.frombuffer(data, dtype=np.uint8)
        else:  # one code point per character, as str indexing counts them
            points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
            codes = np.minimum(points, NOT_ASCII).astype(np.uint8)
            data = codes.tobytes()
            wide_at = np.flatnonzero(codes == NOT_ASCII)
            wide = points[wide_at]
            new = np.unique(wide)
            for code in new[self._classes[new] == _UNKNOWN].tolist():
                self._classes[code] = char_class(chr(code))
        # bytes.translate looks the classes up faster than a numpy gather would.
        classes = np.frombuffer(data.translate(self._ascii), dtype=np.uint8)
        if wide_at is not None:
            classes = classes.copy()
            classes[wide_at] = self._classes[wide]
        n = len(classes)
        change = np.ones(n + 1, dtype=bool)  # change[i]: classes i - 1 and i differ
        np.not_equal(classes[1:], classes[:-1], out=change[1:n])
        in_token = classes != SPACE
        starts = np.flatnonzero(change[:n] & in_token)
        ends = np.flatnonzero(change[1:] & in_token) + 1
        # Text i takes characters [offset_i, offset_i + length_i), then one space.
        first = np.searchsorted(starts, np.cumsum(lengths + 1) - (lengths + 1))
        words = np.diff(np.append(first, len(starts)))
        chars = np.zeros(n + SHORT, dtype=np.uint8)
        chars[:n] = codes
        ascii_tokens = None
        if wide_at is not None:  # the tokens holding a non-ASCII character
            token = np.maximum(np.searchsorted(starts, wide_at, side="right") - 1, 0)
            ascii_tokens = np.ones(len(starts), dtype=bool)
            if len(starts):
                ascii_tokens[token[(wide_at >= starts[token]) & (wide_at < ends[token])]] = False
        return Tokens(text, starts, ends, words, chars, ascii_tokens)


class Vocabulary:
    """Word ids of tokens, each word's UTF-8 bytes and its bucket (`hash_many` of it)."""

    def __init__(self, hash_many: Callable[[list[bytes], int], np.ndarray], buckets: int):
        self._hash_many = hash_many
        self._buckets = buckets
        self._short = IntTable(16)  # key of an ASCII token of up to 8 characters -> id
        self._medium = IntTable(14, width=2)  # the same, 9 to 16 characters, in 2 words
        self._long: dict[str, int] = {}  # any other token -> id
        self.words: list[bytes] = []  # id -> UTF-8 of the word (lone surrogates kept)
        self._buckets_of = np.zeros(1 << 12, dtype=np.int64)  # id -> bucket, with room to grow

    def __len__(self) -> int:
        return len(self.words)

    @property
    def buckets(self) -> np.ndarray:
        """The bucket of each word id."""
        return self._buckets_of[:len(self.words)]

    def ids(self, tokens: Tokens) -> np.ndarray:
        """The word id of every token, in order."""
        ids = np.empty(len(tokens), dtype=np.int64)
        lengths = tokens.ends - tokens.starts
        keyed = lengths <= 2 * SHORT
        if tokens.ascii is not None:
            keyed &= tokens.ascii
        window = np.ndarray((len(tokens.chars) - SHORT + 1,), dtype="<u8",
                            buffer=tokens.chars, strides=(1,))  # 8 bytes from each offset
        for table, at in ((self._short, np.flatnonzero(keyed & (lengths <= SHORT))),
                          (self._medium, np.flatnonzero(keyed & (lengths > SHORT)))):
            if not len(at):
                continue
            starts, size = tokens.starts[at], lengths[at]
            if table is self._short:
                keys = (window[starts] & _MASKS[size]) | _TAGS[size]
            else:  # the first 8 bytes as they are, then the rest keyed like a short token
                size = size - SHORT
                keys = np.stack([window[starts],
                                 (window[starts + SHORT] & _MASKS[size]) | _TAGS[size]], axis=1)
            found, slots = table.find(keys)
            missing = found < 0
            if missing.any():
                new, first, inverse = distinct(keys[missing])
                fresh = self._learn(tokens.strings(at[np.flatnonzero(missing)[first]]))
                table.add(new, fresh, slots[missing][first])
                found[missing] = fresh[inverse.reshape(-1)]
            ids[at] = found
        rest = np.flatnonzero(~keyed)
        if len(rest):
            strings, table = tokens.strings(rest), self._long
            try:
                ids[rest] = np.fromiter(map(table.__getitem__, strings), dtype=np.int64,
                                        count=len(strings))
            except KeyError:
                new = [s for s in dict.fromkeys(strings) if s not in table]
                table.update(zip(new, self._learn(new).tolist(), strict=True))
                ids[rest] = np.fromiter(map(table.__getitem__, strings), dtype=np.int64,
                                        count=len(strings))
        return ids

    def _learn(self, strings: list[str]) -> np.ndarray:
        start, end = len(self.words), len(self.words) + len(strings)
        encoded = [s.encode("utf-8", "surrogatepass") for s in strings]
        if end > len(self._buckets_of):  # doubling: each bucket is copied O(1) times
            grown = np.zeros(max(end, 2 * len(self._buckets_of)), dtype=np.int64)
            grown[:start] = self._buckets_of[:start]
            self._buckets_of = grown
        self._buckets_of[start:end] = self._hash_many(encoded, self._buckets)
        self.words += encoded
        return np.arange(start, end, dtype=np.int64)
