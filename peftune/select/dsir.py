"""DSIR: data selection with importance resampling (Xie et al. 2023, "Data Selection for
Language Models via Importance Resampling"), with hashed n-gram features.

Two bags of hashed n-grams are fitted, one over the target sample and one over the raw pool
(`p(b) = count_b / total`; the target may take a Laplace pseudo-count). A pool row x gets the
log importance weight

    log w(x) = sum_b count_b(x) * (log(p_target(b) + 1e-8) - log(p_raw(b) + 1e-8))

(optionally divided by its number of n-grams), and k rows are drawn without replacement in
proportion to w by Gumbel top-k: the k largest `log w + Gumbel(0, 1)`. `sampling: top_k`
takes the k largest `log w` instead. Several target files can be one pooled target, or, with
`target_weights`, one model each, with k split by the weights and each target choosing its
share among the rows the previous targets left (the reference package's
`separate_targets`).

Noise is drawn per row from its global index and the seed (in fixed blocks of rows), so the
result is the same whatever the number of worker processes or ranks.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-8  # inside the logs, as in the paper's reference implementation
NOISE_BLOCK = 1 << 16


def bag_of_ngrams(counts: np.ndarray, pseudo_count: float = 0.0) -> np.ndarray:
    """Probabilities of a bag of hashed n-grams, with `pseudo_count` added to every bucket."""
    counts = np.asarray(counts, dtype=np.float64) + pseudo_count
    total = counts.sum()
    return counts / total if total > 0 else counts


def log_importance_ratio(target_probs: np.ndarray, raw_probs: np.ndarray) -> np.ndarray:
    """`log(p_target + 1e-8) - log(p_raw + 1e-8)` per bucket."""
    return np.log(target_probs + EPS) - np.log(raw_probs + EPS)


def dsir_log_weights(ids: np.ndarray, sizes: np.ndarray, log_ratio: np.ndarray, *,
                     length_normalize: bool = False) -> np.ndarray:
    """Per-row `sum_b count_b(x) * log_ratio[b]` for rows whose n-gram ids lie back to back in
    `ids`, `sizes[i]` of them for row i. Rows without n-grams weigh 0."""
    contributions = log_ratio[ids]
    weights = np.zeros(len(sizes))
    nonempty = sizes > 0
    starts = np.cumsum(sizes) - sizes
    if nonempty.any():
        # Each row's own segment, summed in order: exact per row, whatever the chunking.
        weights[nonempty] = np.add.reduceat(contributions, starts[nonempty])
    if length_normalize:
        weights = weights / np.maximum(sizes, 1)
    return weights


def gumbel_noise(seed: int, indices: np.ndarray, stream: int = 0) -> np.ndarray:
    """Gumbel(0, 1) noise for the rows at global `indices`: row i's value depends only on
    (seed, stream, i), so any sharding of the rows draws the same noise."""
    indices = np.asarray(indices, dtype=np.int64)
    noise = np.empty(len(indices))
    blocks = indices // NOISE_BLOCK
    for block in np.unique(blocks):
        where = blocks == block
        drawn = np.random.default_rng([seed, stream, int(block)]).gumbel(size=NOISE_BLOCK)
        noise[where] = drawn[indices[where] % NOISE_BLOCK]
    return noise


def top_k(keys: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest keys, ties broken by position (lowest first); -inf keys are
    never taken. Returned in descending key order."""
    keys = np.asarray(keys, dtype=np.float64)
    candidates = np.flatnonzero(np.isfinite(keys) | (keys > 0))
    if len(candidates) > 4 * k:
        threshold = np.partition(keys[candidates], len(candidates) - k)[len(candidates) - k]
        candidates = candidates[keys[candidates] >= threshold]
    order = np.lexsort((candidates, -keys[candidates]))
    return candidates[order[:k]]


def split_k(k: int, weights: list[float]) -> list[int]:
    """k split by proportions as the reference does: floor each share, the remainder to the
    last target with a positive weight (a weight of 0 gets no rows)."""
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    shares = [int(k * w) for w in weights]
    last = int(np.flatnonzero(weights > 0)[-1])
    shares[last] += k - sum(shares)
    return shares


def choose(keys: np.ndarray, quotas: list[int]) -> np.ndarray:
    """Sorted positions chosen by each target in turn: target t takes its quota of the largest
    `keys[:, t]` among rows no earlier target took. `keys` is (rows, targets)."""
    keys = np.array(keys, dtype=np.float64).reshape(len(keys), -1)
    taken: list[np.ndarray] = []
    available = np.ones(len(keys), dtype=bool)
    for t, quota in enumerate(quotas):
        if quota == 0:
            continue
        column = np.where(available, keys[:, t], -np.inf)
        picked = top_k(column, quota)
        available[picked] = False
        taken.append(picked)
    return np.sort(np.concatenate(taken)) if taken else np.zeros(0, dtype=np.int64)
