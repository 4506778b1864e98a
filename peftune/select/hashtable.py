"""A hash table from keys of one or two uint64 words to int64 values that looks up and
inserts whole arrays of keys with numpy.

The n-gram featurizer maps every token and every pair of neighbouring tokens of a chunk of
texts to an id or a bucket. A Python dict costs a lookup (and a Python object) per token;
this table costs a few numpy passes per chunk.

Open addressing over 2**bits slots, at most half full, so almost every key is found at its
first slot. A slot is one row (key words, value), so a lookup touches one cache line. A
zero last key word marks an empty slot: keys must end in a non-zero word. A key's first
slot is the top `bits` bits of its words mixed and times 0x9E3779B97F4A7C15 (Fibonacci
hashing, which spreads structured keys such as packed pairs of small ids); it probes on by
a step of its own (double hashing), so the few keys whose slot is taken need a few more
numpy passes, not the long runs that linear probing makes.
"""

from __future__ import annotations

import numpy as np

_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # 2**64 divided by the golden ratio, odd
_STEP = np.uint64(0xC2B2AE3D27D4EB4F)  # another odd multiplier, for the probe step


def distinct(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the distinct keys, sorted; a position of each in `keys`; each key's index in the
    distinct keys), like `np.unique(keys, return_index=True, return_inverse=True)` for keys
    of shape (n,) or rows of (n, width), but the position is any one of a key's
    occurrences, which lets the sort be unstable: ~2x faster (and ~3x for rows)."""
    if keys.ndim == 1:
        order = np.argsort(keys)
        ordered = keys[order]
        fresh = np.empty(len(keys), dtype=bool)
        fresh[:1] = True
        np.not_equal(ordered[1:], ordered[:-1], out=fresh[1:])
    else:
        order = np.lexsort(keys.T[::-1])  # by the first word, then the next, ...
        ordered = keys[order]
        fresh = np.empty(len(keys), dtype=bool)
        fresh[:1] = True
        np.any(ordered[1:] != ordered[:-1], axis=1, out=fresh[1:])
    inverse = np.empty(len(keys), dtype=np.int64)
    inverse[order] = np.cumsum(fresh) - 1
    return ordered[fresh], order[fresh], inverse


class IntTable:
    """Distinct keys (`width` uint64 words, the last non-zero) -> int64 values; nothing is
    ever removed. Keys are arrays of shape (n,) for width 1, (n, width) otherwise."""

    def __init__(self, bits: int = 12, *, width: int = 1) -> None:
        self.count = 0
        self._width = width
        self._allocate(bits)

    def __len__(self) -> int:
        return self.count

    def _allocate(self, bits: int) -> None:
        self._shift = np.uint64(64 - bits)
        self._mask = (1 << bits) - 1
        self._slots = np.zeros((1 << bits, self._width + 1), dtype=np.uint64)
        # The rows as single items: gathering those is ~4x faster than rows of a 2-D array.
        self._rows = self._slots.view(f"V{8 * (self._width + 1)}").reshape(-1)

    def _words(self, keys: np.ndarray) -> np.ndarray:
        return keys.reshape(len(keys), self._width)

    def _mixed(self, keys: np.ndarray) -> np.ndarray:
        if self._width == 1:
            return keys
        words = self._words(keys)
        mixed = words[:, 0].copy()
        for i in range(1, self._width):
            mixed *= _STEP
            mixed += words[:, i]
        return mixed

    def _first_slots(self, mixed: np.ndarray) -> np.ndarray:
        return ((mixed * _FIBONACCI) >> self._shift).view(np.intp)

    def _steps(self, mixed: np.ndarray) -> np.ndarray:
        return ((mixed * _STEP) >> self._shift).view(np.intp) | 1  # odd: visits every slot

    def _gather(self, slots: np.ndarray) -> np.ndarray:
        return self._rows[slots].view(np.uint64).reshape(-1, self._width + 1)

    def _equal(self, rows: np.ndarray, words: np.ndarray) -> np.ndarray:
        if self._width == 1:
            return rows[:, 0] == words[:, 0]
        return (rows[:, :-1] == words).all(axis=1)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the value of each key, -1 where it is not in the table; the slot of each key, or
        for a missing key the free slot its probing ended at, where `add` can put it)."""
        mixed, words = self._mixed(keys), self._words(keys)
        slots = self._first_slots(mixed)
        rows = self._gather(slots)
        hit = self._equal(rows, words)
        values = np.where(hit, rows[:, -1].view(np.int64), -1)
        pending = np.flatnonzero(~hit)
        pending = pending[rows[pending, -2] != 0]  # their slot holds another key: probe on
        words, steps = words[pending], self._steps(mixed[pending])
        at = (slots[pending] + steps) & self._mask
        while len(pending):
            slots[pending] = at
            rows = self._gather(at)
            hit = self._equal(rows, words)
            values[pending[hit]] = rows[hit, -1].view(np.int64)
            more = ~hit & (rows[:, -2] != 0)
            pending, words, steps = pending[more], words[more], steps[more]
            at = (at[more] + steps) & self._mask
        return values, slots

    def add(self, keys: np.ndarray, values: np.ndarray, slots: np.ndarray | None = None) -> None:
        """Insert `keys` (distinct, none in the table yet) with `values`; `slots`, from
        `find`, saves probing again."""
        if 2 * (self.count + len(keys)) > len(self._slots):
            self._grow(self.count + len(keys))
            slots = None
        self.count += len(keys)
        mixed = self._mixed(keys)
        slots = self._first_slots(mixed) if slots is None else slots
        steps = self._steps(mixed)
        words = self._words(keys)
        rows = np.empty((len(keys), self._width + 1), dtype=np.uint64)
        rows[:, :-1] = words
        rows[:, -1] = np.asarray(values, dtype=np.int64).view(np.uint64)
        items = rows.view(self._rows.dtype).reshape(-1)
        while len(items):
            free = np.flatnonzero(self._gather(slots)[:, -2] == 0)
            # Rows that reached the same free slot are all written there: one of them stays
            # and the others probe on (the slot is taken now). Reading the slot back tells
            # which, whatever order numpy writes in.
            self._rows[slots[free]] = items[free]
            placed = free[self._equal(self._gather(slots[free]), words[free])]
            if len(placed) == len(items):
                return
            rest = np.ones(len(items), dtype=bool)
            rest[placed] = False
            items, words, steps = items[rest], words[rest], steps[rest]
            slots = (slots[rest] + steps) & self._mask

    def _grow(self, needed: int) -> None:
        bits = int(self._mask).bit_length()
        while 2 * needed > 1 << bits:
            bits += 1
        live = self._slots[self._slots[:, -2] != 0]
        self._allocate(bits)
        self.count = 0
        keys = live[:, 0] if self._width == 1 else live[:, :-1]
        self.add(np.ascontiguousarray(keys), live[:, -1].view(np.int64))
