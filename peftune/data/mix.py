"""Weighted data mixing: each epoch draws from the sources of `data.train: [{path, weight},
...]` in proportion to their weights.

An epoch has E = the sum of the sources' sizes (in units: an example, or a preference pair),
so that `train.epochs` means what it means for the same files concatenated, and the weights
decide only the proportions. Source i gives n_i examples, E·w_i/Σw rounded by largest
remainder (Hamilton's method: the n_i add up to E exactly; ties go to the earlier source).
They are the first n_i of a permutation of the source seeded by (seed, epoch, i), cycled
through when n_i exceeds the source's size (upsampling: each example then comes
⌊n_i/size⌋ or ⌈n_i/size⌉ times) and cut short when it is smaller (downsampling: each epoch
another subset). The same (seed, epoch) draws the same examples on every process and after a
resume; the epoch's examples are then packed into rows (`pack_rows`, deterministic), so
rows, like the draw, are a function of (seed, epoch) alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from peftune.data.packing import Row, pack_rows, row_bins
from peftune.data.tokenized import MixSource, TokenizedSet

_MIX_STREAM = 0x313C  # keeps the mix's draws apart from the other seeded streams


def draw_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Units each source gives an epoch of sum(sizes): proportional to `weights`, rounded by
    largest remainder so that they add up exactly."""
    total, mass = sum(sizes), sum(weights)
    exact = [total * w / mass for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


class TrainingMix:
    """The training set of a data mix and its per-epoch draw. `data` holds every source's
    examples end to end (`sources` say where each one's are); an epoch's rows carry each
    example's index in `data` (`Row.example_indices`), whatever epoch drew it."""

    def __init__(self, data: TokenizedSet, sources: list[MixSource], *, seed: int,
                 max_length: int, packing: bool):
        self.data, self.sources = data, sources
        self.seed, self.max_length, self.packing = seed, max_length, packing
        self.group = data.group  # a preference pair is drawn whole
        self.sizes = [(s.stop - s.start) // self.group for s in sources]
        self.counts = draw_counts(self.sizes, [s.weight for s in sources])
        self._rows: tuple[int, list[Row]] | None = None  # the last epoch's, built once

    def draw(self, epoch: int) -> np.ndarray:
        """The indices in `data` of the examples epoch `epoch` trains on, source by source."""
        units = []
        for i, (source, size, count) in enumerate(zip(self.sources, self.sizes, self.counts,
                                                      strict=True)):
            if not count:
                continue
            order = np.random.default_rng([self.seed % 2**63, _MIX_STREAM, epoch, i]).permutation(size)
            units.append(source.start // self.group + np.resize(order, count))
        chosen = np.concatenate(units) if units else np.zeros(0, np.int64)
        return (chosen[:, None] * self.group + np.arange(self.group)).ravel()

    def rows(self, epoch: int) -> list[Row]:
        """Epoch `epoch`'s rows (packed as data.packing says); the last epoch's are kept."""
        if self._rows is None or self._rows[0] != epoch:
            drawn = self.draw(epoch)
            self._rows = (epoch, pack_rows(self.data.select(drawn), max_length=self.max_length,
                                           packing=self.packing, seed=self.seed,
                                           example_ids=drawn))
        return self._rows[1]

    def row_count(self, epoch: int) -> int:
        """len(rows(epoch)), from the examples' lengths alone (no tokens copied)."""
        if self._rows is not None and self._rows[0] == epoch:
            return len(self._rows[1])
        lengths = self.data.lengths[self.draw(epoch)]
        return len(row_bins(lengths, self.group, max_length=self.max_length,
                            packing=self.packing, seed=self.seed))

    def report(self, *, epochs: int) -> list[dict[str, Any]]:
        """Per source (summary.json's data.mix): its path and weight, examples it has and
        gives each epoch, the share of an epoch's examples, and of the tokens drawn over the
        first `epochs` epochs, and how many times an epoch repeats its examples (< 1: it
        uses part of them)."""
        lengths = self.data.lengths
        tokens = np.zeros(len(self.sources), dtype=np.int64)
        for epoch in range(max(epochs, 1)):
            drawn = self.draw(epoch)
            owner = np.searchsorted([s.stop for s in self.sources], drawn, side="right")
            tokens += np.bincount(owner, weights=lengths[drawn],
                                  minlength=len(self.sources)).astype(np.int64)
        total = sum(self.counts)
        return [{"key": s.key, "path": s.path, "weight": s.weight, "examples": size,
                 "drawn_per_epoch": count, "share": round(count / total, 6),
                 "token_share": round(int(t) / max(int(tokens.sum()), 1), 6),
                 "repeats": round(count / size, 4) if size else 0.0}
                for s, size, count, t in zip(self.sources, self.sizes, self.counts, tokens,
                                             strict=True)]

    def describe(self) -> str:
        """One line for the run's header: each source's share of an epoch and repeats."""
        total = sum(self.counts)
        parts = [f"{Path(s.path).name} {100 * count / total:.1f}% ({count:,} of {size:,}, "
                 f"x{count / size:.2f})" for s, size, count in zip(
                     self.sources, self.sizes, self.counts, strict=True)]
        unit = "pairs" if self.group > 1 else "examples"
        return f"data mix: {total:,} {unit} an epoch: " + ", ".join(parts)
