"""Scoring chunks of pool rows, in the main process or in worker processes.

The state a worker needs (text rule, hasher, ZIP-FIT scorer) is built once in the parent and
inherited by forked workers, so targets are compressed and n-gram models built only once.
At most two chunks per worker are in flight, so a pool larger than memory streams through.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np

from peftune.data.formats import RowError
from peftune.select.ngrams import NgramHasher
from peftune.select.pool import Chunk, TextRule, parse_lines, parse_payload
from peftune.select.zipfit import ZipFitScorer


@dataclass
class Scorer:
    """What scoring a chunk needs. DSIR's rows are featurized here and weighed later, once
    the raw pool's n-gram model is known; ZIP-FIT's rows are scored here."""

    rule: TextRule
    hasher: NgramHasher
    label_field: str | None = None
    shortest: int = 1  # rows with fewer words are never selected (SelectConfig.shortest)
    zipfit: ZipFitScorer | None = None
    skip_bad_rows: bool = False


@dataclass
class ChunkScores:
    chunk: int
    first_row: int
    rows: int
    words: np.ndarray  # word-punct tokens per row
    ids: np.ndarray  # hashed n-gram ids of every row, back to back
    sizes: np.ndarray  # n-grams per row
    scores: np.ndarray | None = None  # ZIP-FIT only; NaN where a row is below min_length
    labels: Counter = field(default_factory=Counter)
    skipped: int = 0  # bad rows left out (on_bad_row: skip)
    nbytes: int = 0  # bytes of the JSONL lines read, for progress
    error: str | None = None  # "file:line: problem" of the chunk's first bad row


def score_chunk(scorer: Scorer, chunk: Chunk) -> ChunkScores:
    chunk.load()
    read = _read_at_once(scorer, chunk) or _read_row_by_row(scorer, chunk)
    if isinstance(read, str):
        empty = np.zeros(0, dtype=np.int64)
        return ChunkScores(chunk.index, chunk.first_row, len(chunk.payloads), empty, empty,
                           empty, error=read)
    texts, labels, skipped = read
    ids, sizes, words = scorer.hasher.featurize(texts)
    out = ChunkScores(chunk.index, chunk.first_row, len(texts), words, ids, sizes,
                      labels=labels, skipped=skipped, nbytes=chunk.nbytes)
    if scorer.zipfit is not None:
        keep = words >= scorer.shortest
        out.scores = np.full(len(texts), np.nan)
        docs = [encode_text(text) for text, ok in zip(texts, keep, strict=True) if ok]
        out.scores[keep] = scorer.zipfit.scores(docs)
    return out


def _read_at_once(scorer: Scorer, chunk: Chunk) -> tuple[list[str], Counter, int] | None:
    """(texts, labels, 0) of a chunk whose rows are all good, found with C-level maps over
    the whole chunk; None when a row needs reading one by one (which then tells why)."""
    rows = chunk.payloads
    if rows and isinstance(rows[0], bytes):
        rows = parse_lines(rows)
        if rows is None:
            return None
    texts = scorer.rule.texts(rows)
    if texts is None:
        return None
    labels: Counter = Counter()
    if scorer.label_field is not None:
        try:
            labels.update(map(str, map(itemgetter(scorer.label_field), rows)))
        except KeyError:
            return None
    return texts, labels, 0


def _read_row_by_row(scorer: Scorer, chunk: Chunk) -> tuple[list[str], Counter, int] | str:
    """(texts, labels, rows skipped) of a chunk, or "file:line: problem" of its first bad row
    (bad rows score as empty texts with `on_bad_row: skip`)."""
    texts: list[str] = []
    labels: Counter = Counter()
    skipped = 0
    for position, payload in enumerate(chunk.payloads):
        try:
            row = parse_payload(payload)
            text = scorer.rule.text(row)
            label = label_of(row, scorer.label_field) if scorer.label_field else None
        except RowError as err:
            if scorer.skip_bad_rows and not err.fatal:
                texts.append("")  # no words: never selected, never written
                skipped += 1
                continue
            return f"{chunk.location(position)}: {err.message}"
        texts.append(text)
        if label is not None:
            labels[label] += 1
    return texts, labels, skipped


def encode_text(text: str) -> bytes:
    """UTF-8 bytes of a text; a lone surrogate (valid in JSON, not in UTF-8) is kept as its
    three bytes rather than failing the run."""
    return text.encode("utf-8", "surrogatepass")


def first_scores(scores: np.ndarray) -> np.ndarray:
    """The per-row scores, or the first target's column when DSIR scored several targets."""
    return scores.reshape(len(scores), -1)[:, 0]


def label_of(row: dict, name: str) -> str:
    if name not in row:
        raise RowError("missing label field", name)
    return str(row[name])


_WORKER: Scorer | None = None


def _work(chunk: Chunk) -> ChunkScores:
    assert _WORKER is not None  # set by the parent before forking
    return score_chunk(_WORKER, chunk)


def _worker_start() -> None:
    # The parent's SIGTERM handler (clean-up: `cleanup_on_sigterm`) is inherited by the
    # fork; in a worker it would turn the pool's own SIGTERM at shutdown into a SystemExit
    # that can leave the worker blocked on the task queue's lock, and the parent waiting
    # for it forever. A worker has nothing to clean up: it just ends.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def worker_count(num_proc: int) -> int:
    """`num_proc`, with 0 meaning every core this process may use."""
    if num_proc > 0:
        return num_proc
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def score_chunks(scorer: Scorer, chunks: Iterable[Chunk], *, processes: int) -> Iterator[ChunkScores]:
    """Scores in chunk order, computed by `processes` forked workers (1: in this process)."""
    if processes <= 1:
        for chunk in chunks:
            yield score_chunk(scorer, chunk)
        return
    global _WORKER
    _WORKER = scorer
    context = multiprocessing.get_context("fork")
    pool = context.Pool(processes, initializer=_worker_start)
    try:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_work, (chunk,)))
            if len(pending) >= 2 * processes:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        # All scored: the workers end on the queue's sentinel. Terminating them instead
        # (SIGTERM while one may hold the task queue's lock) could leave one blocked for good.
        pool.close()
        pool.join()
    finally:
        pool.terminate()  # an error or an early stop: end them; after join() a no-op
        _WORKER = None
