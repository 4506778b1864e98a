"""`run_select`: stream the pool once to score it, choose k rows, stream it again to write them.

    targets  read the target files; fit DSIR's target model / compress ZIP-FIT's targets
    score    one pass over the pool in fixed chunks (worker processes, ranks): each row's
             hashed n-gram ids are spilled to disk, ZIP-FIT keeps one score per row
    select   DSIR weighs the spilled rows against the raw model; Gumbel or plain top-k
    write    the selection and a random one of equal size are measured from the spill (KL
             reduction, lengths), and a second pass writes the chosen rows unchanged, in pool
             order (and counts their labels); scores.png is drawn on a thread meanwhile

Memory is one float64 per pool row plus a chunk per worker. Everything is written into a
temporary directory beside `out`, renamed into place at the end: a failed run leaves nothing.
Under a multi-process launcher (torchrun, accelerate launch) rank r takes chunks r, r + W,
...; raw n-gram counts are summed across ranks, each rank proposes its own top-k, and rank 0
merges them into exactly the single-process selection and writes the output.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from peftune.dist import Ranks
from peftune.errors import InputError
from peftune.select import dsir
from peftune.select.config import SelectConfig
from peftune.select.kl import kl_divergence
from peftune.select.ngrams import NgramHasher, bucket_dtype
from peftune.select.output import (
    check_out_dir,
    cleanup_on_sigterm,
    make_work_dir,
    measure_spilled,
    publish,
    random_rows,
    write_selection,
)
from peftune.select.pool import (
    TextRule,
    iter_chunks,
    read_texts,
    resolve_files,
)
from peftune.select.report import (
    LENGTH_CAP,
    PlotThread,
    Reporter,
    build_report,
    length_summary,
    select_yaml,
)
from peftune.select.scoring import (
    ChunkScores,
    Scorer,
    encode_text,
    first_scores,
    score_chunks,
    worker_count,
)
from peftune.select.zipfit import ZipFitScorer


@dataclass
class PoolPass:
    """What the scoring pass leaves on one rank: per-row scores (ZIP-FIT at once, DSIR after
    the raw model is known), pool-wide counts, and the spilled features of its rows."""

    raw_counts: np.ndarray
    rows: int = 0
    length_hist: np.ndarray = field(default_factory=lambda: np.zeros(LENGTH_CAP + 1, np.int64))
    labels: Counter = field(default_factory=Counter)
    chunks: list[tuple[int, int, int]] = field(default_factory=list)  # (chunk, first row, rows)
    scores: dict[int, np.ndarray] = field(default_factory=dict)  # chunk -> scores
    # chunk -> (first n-gram, n-grams, first row) in the spill files
    spill: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    spilled: tuple[int, int] = (0, 0)  # n-grams and rows written so far
    skipped: int = 0
    seconds: float = 0.0


def run_select(cfg: SelectConfig, *, out: Path, overwrite: bool = False, quiet: bool = False,
               key: str = "select", pool_key: str | None = None) -> dict:
    """Select `cfg.k` rows of `cfg.pool` that resemble `cfg.target` and write them to `out`;
    returns the report (an empty dict on ranks other than 0). `key` and `pool_key` name the
    recipe keys in messages (`data.select`, `data.train` when a training recipe selects)."""
    started = time.perf_counter()
    keys = _Keys(key, pool_key or f"{key}.pool")
    out = Path(os.path.abspath(out))
    check_out_dir(out, overwrite=overwrite, key=f"{key}.out")
    pool_files = resolve_files(cfg.pool, keys.pool)
    target_files = resolve_files(cfg.target, keys.target)
    with cleanup_on_sigterm():
        return _run(cfg, out, keys, pool_files, target_files, quiet=quiet, started=started)


@dataclass(frozen=True)
class _Keys:
    """The recipe keys that messages name."""

    prefix: str
    pool: str

    @property
    def target(self) -> str:
        return f"{self.prefix}.target"

    @property
    def k(self) -> str:
        return f"{self.prefix}.k"


def _run(cfg: SelectConfig, out: Path, keys: _Keys, pool_files: list[Path],
         target_files: list[Path], *, quiet: bool, started: float) -> dict:
    ranks = Ranks(backend="gloo")  # the gathers are of CPU objects
    reporter = Reporter(quiet=quiet or ranks.rank != 0)
    timings: dict[str, float] = {}

    tick = time.perf_counter()
    # ZIP-FIT's KL reduction is measured on DSIR's default features, so it reads the same.
    hasher = NgramHasher(buckets=cfg.buckets, ngrams=cfg.ngrams, hash=cfg.hash)
    target_texts, target_counts = [], []
    for path, shown in zip(target_files, cfg.target, strict=True):
        texts = read_texts([path], [shown], TextRule.for_target(cfg), key=keys.target)
        counts = hasher.counts(texts)
        if not texts or not counts.any():
            what = "has no rows" if not texts else "has only empty texts"
            raise InputError(f"{keys.target}: {shown} {what}; the target sample must hold at "
                             "least one example of the text to select for")
        target_texts.append(texts)
        target_counts.append(counts)
    zipfit = _zipfit_scorer(cfg, target_texts) if cfg.method == "zipfit" else None
    timings["targets"] = time.perf_counter() - tick

    work, created = make_work_dir(out, key=f"{keys.prefix}.out")
    finished = False
    plotter = PlotThread() if ranks.rank == 0 else None
    try:
        processes = worker_count(cfg.num_proc)
        scorer = Scorer(TextRule.for_pool(cfg), hasher, cfg.label_field, cfg.shortest, zipfit,
                        skip_bad_rows=cfg.on_bad_row == "skip")
        reporter.start_pass(pool_files, processes=processes, world=ranks.world)
        spans: dict = {}  # the JSONL files' chunks, found once for both passes
        scored = _score_pool(cfg, scorer, pool_files, work, ranks, reporter, keys,
                             processes=processes, spans=spans,
                             started=plotter.warm if plotter is not None else None)
        timings["score"] = scored.seconds

        tick = time.perf_counter()
        raw_counts = sum(ranks.gather(scored.raw_counts))
        if cfg.method == "dsir":
            log_ratios = _dsir_log_ratios(cfg, target_counts, raw_counts)
            for chunk, _, rows in scored.chunks:
                scored.scores[chunk] = _dsir_chunk_weights(cfg, work, scored.spill[chunk], rows,
                                                           log_ratios)
        shares = dsir.split_k(cfg.k, cfg.target_weights) if cfg.target_weights else [cfg.k]
        gathered = ranks.gather((_propose(cfg, scored, shares), scored.rows, scored.labels,
                                 scored.length_hist, scored.scores, scored.skipped))
        pool_rows = sum(g[1] for g in gathered)
        scores = _assemble([g[4] for g in gathered])
        _check_k(cfg, scores, pool_rows, keys)
        selected = _merge([g[0] for g in gathered], shares)  # on every rank, the same
        baseline = random_rows(scores, len(selected), cfg.seed)
        timings["select"] = time.perf_counter() - tick
        if plotter is not None:
            plotter.draw(work / "scores.png", scores, selected, cfg)

        tick = time.perf_counter()
        # Each rank measures the selection and the random baseline in its own chunks.
        measured = ranks.gather(measure_spilled(work, scored.chunks, scored.spill,
                                                [selected, baseline], buckets=cfg.buckets))
        if ranks.rank != 0:
            finished = True  # rank 0 writes the output, possibly into parents this rank made
            return {}
        (selected_counts, selected_lengths), (random_counts, _) = [
            (sum(rank[i][0] for rank in measured), sum(rank[i][1] for rank in measured))
            for i in range(2)]
        selected_labels = write_selection(cfg, pool_files, work, selected, spans)
        timings["write"] = time.perf_counter() - tick

        target_mix = _target_mixture(cfg, target_counts)
        kl = {"target_vs_raw": kl_divergence(target_mix, raw_counts),
              "target_vs_selected": kl_divergence(target_mix, selected_counts),
              "target_vs_random": kl_divergence(target_mix, random_counts)}
        kl["reduction"] = kl["target_vs_raw"] - kl["target_vs_selected"]
        kl["random_reduction"] = kl["target_vs_raw"] - kl["target_vs_random"]
        tick = time.perf_counter()
        for spill in work.glob("spill.*"):
            spill.unlink()
        np.save(work / "scores.npy", scores)
        (work / "select.yaml").write_text(select_yaml(cfg))
        plotter.wait()
        timings["outputs"] = time.perf_counter() - tick
        timings["total"] = time.perf_counter() - started  # everything but report.json itself
        report = build_report(
            cfg, pool_rows=pool_rows, target_rows=[len(t) for t in target_texts],
            zipfit_targets=len(zipfit.targets) if zipfit else None, timings=timings, kl=kl,
            pool_labels=sum((g[2] for g in gathered), Counter()),
            selected_labels=selected_labels,
            pool_lengths=length_summary(sum(g[3] for g in gathered)),
            selected_lengths=length_summary(selected_lengths),
            skipped_rows=sum(g[5] for g in gathered),
            scores=scores, selected=selected, processes=processes, world=ranks.world)
        (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        publish(work, out)
        finished = True
        reporter.finish(report, out)
        return report
    finally:
        reporter.close()
        shutil.rmtree(work, ignore_errors=True)
        if not finished and created is not None:
            shutil.rmtree(created, ignore_errors=True)  # parents this run made, now empty


def _zipfit_scorer(cfg: SelectConfig, target_texts: list[list[str]]) -> ZipFitScorer:
    targets = [encode_text(text) for texts in target_texts for text in texts]
    if cfg.target_sample is not None and cfg.target_sample < len(targets):
        # An approximation: the mean NCD over a random subset of the targets.
        keep = np.random.default_rng(cfg.seed).choice(len(targets), cfg.target_sample,
                                                      replace=False)
        targets = [targets[i] for i in np.sort(keep)]
    return ZipFitScorer(targets, compressor=cfg.compressor, level=cfg.compression_level)


def _score_pool(cfg: SelectConfig, scorer: Scorer, files: list[Path], work: Path,
                ranks: Ranks, reporter: Reporter, keys: _Keys, *, processes: int,
                spans: dict, started: Callable[[], None] | None = None) -> PoolPass:
    """The scoring pass over this rank's chunks; a bad row on any rank stops every rank.
    `started` is called with the first scored chunk, when the worker processes exist."""
    scored = PoolPass(raw_counts=np.zeros(scorer.hasher.buckets, dtype=np.int64))
    tick = time.perf_counter()
    problem = None
    try:
        chunks = iter_chunks(files, list(cfg.pool), key=keys.pool,
                             owner=(ranks.rank, ranks.world), lazy=True, spans=spans)
        for result in score_chunks(scorer, chunks, processes=processes):
            if result.error is not None:
                problem = f"{keys.pool}: {result.error}"
                break
            _absorb(cfg, scored, result, work)
            reporter.advance(result.rows, result.nbytes)
            if started is not None:
                started()
                started = None
    except InputError as err:
        problem = err.lines[0]
    problems = [p for p in ranks.gather(problem) if p is not None]
    if problems:
        raise InputError(problems[0])
    reporter.end_pass()
    scored.seconds = time.perf_counter() - tick
    return scored


def _absorb(cfg: SelectConfig, scored: PoolPass, result: ChunkScores, work: Path) -> None:
    scored.rows += result.rows
    scored.raw_counts += np.bincount(result.ids, minlength=len(scored.raw_counts))
    lengths = np.bincount(np.minimum(result.words, LENGTH_CAP))
    scored.length_hist[:len(lengths)] += lengths
    scored.labels.update(result.labels)
    scored.skipped += result.skipped
    scored.chunks.append((result.chunk, result.first_row, result.rows))
    if cfg.method == "zipfit":
        scored.scores[result.chunk] = result.scores
    # Every row's features wait on disk, appended to two files (n-gram ids; per row, n-grams
    # and words): DSIR's weights need the whole pool's n-gram model first, and the selection
    # is measured from them without tokenising it again.
    with (work / "spill.ids").open("ab") as sink:
        result.ids.tofile(sink)
    with (work / "spill.rows").open("ab") as sink:
        np.stack([result.sizes, result.words], axis=1).astype(np.int64).tofile(sink)
    grams, rows = scored.spilled
    scored.spill[result.chunk] = (grams, len(result.ids), rows)
    scored.spilled = (grams + len(result.ids), rows + result.rows)


def _dsir_log_ratios(cfg: SelectConfig, target_counts: list[np.ndarray],
                     raw_counts: np.ndarray) -> list[np.ndarray]:
    """One log ratio per target model: the pooled targets, or one per file with weights."""
    raw = dsir.bag_of_ngrams(raw_counts)
    models = target_counts if cfg.target_weights else [sum(target_counts)]
    return [dsir.log_importance_ratio(dsir.bag_of_ngrams(counts, cfg.pseudo_count), raw)
            for counts in models]


def _dsir_chunk_weights(cfg: SelectConfig, work: Path, spilled: tuple[int, int, int],
                        rows: int, log_ratios: list[np.ndarray]) -> np.ndarray:
    first_gram, grams, first_row = spilled
    dtype = np.dtype(bucket_dtype(cfg.buckets))
    ids = np.fromfile(work / "spill.ids", dtype=dtype, count=grams,
                      offset=first_gram * dtype.itemsize)
    per_row = np.fromfile(work / "spill.rows", dtype=np.int64, count=2 * rows,
                          offset=first_row * 16).reshape(rows, 2)
    sizes, words = per_row[:, 0], per_row[:, 1]
    weights = np.stack([dsir.dsir_log_weights(ids, sizes, ratio,
                                              length_normalize=cfg.length_normalize)
                        for ratio in log_ratios], axis=1)
    weights[words < cfg.shortest] = np.nan
    return weights if len(log_ratios) > 1 else weights[:, 0]


def _keys(cfg: SelectConfig, scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Sort keys (rows, targets): the score, plus Gumbel noise for DSIR's sampling; rows
    below min_length (NaN) never win."""
    keys = np.where(np.isnan(scores), -np.inf, scores).reshape(len(scores), -1)
    if cfg.method == "dsir" and cfg.sampling == "gumbel":
        for t in range(keys.shape[1]):
            keys[:, t] = keys[:, t] + dsir.gumbel_noise(cfg.seed, rows, stream=t)
    return keys


def _propose(cfg: SelectConfig, scored: PoolPass, shares: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """This rank's candidates: for each target, its k best rows here (global rows, keys).
    Any row the merged selection takes is among them."""
    if not scored.chunks:
        return np.zeros(0, np.int64), np.zeros((0, len(shares)))
    rows = np.concatenate([np.arange(first, first + n) for _, first, n in scored.chunks])
    scores = np.concatenate([scored.scores[chunk] for chunk, _, _ in scored.chunks])
    keys = _keys(cfg, scores, rows)
    best = np.unique(np.concatenate([dsir.top_k(keys[:, t], sum(shares))
                                     for t in range(keys.shape[1])]))
    return rows[best], keys[best]


def _merge(proposals: list[tuple[np.ndarray, np.ndarray]], shares: list[int]) -> np.ndarray:
    """The selection (global rows, sorted) from every rank's candidates: the same rows one
    process would choose, because ties break by global row in both."""
    rows = np.concatenate([p[0] for p in proposals])
    keys = np.concatenate([p[1] for p in proposals])
    order = np.argsort(rows, kind="stable")
    chosen = dsir.choose(keys[order], shares)
    return rows[order][chosen]


def _assemble(shards: list[dict[int, np.ndarray]]) -> np.ndarray:
    """Per-row scores in pool order from every rank's chunk -> scores maps."""
    merged = {chunk: scores for shard in shards for chunk, scores in shard.items()}
    return np.concatenate([merged[chunk] for chunk in sorted(merged)]) if merged \
        else np.zeros(0)


def _check_k(cfg: SelectConfig, scores: np.ndarray, pool_rows: int, keys: _Keys) -> None:
    files = ", ".join(cfg.pool)
    if pool_rows == 0:
        raise InputError(f"{keys.pool}: the pool has no rows ({files}); give files with at "
                         "least k rows")
    if cfg.k > pool_rows:
        raise InputError(f"{keys.k}: k={cfg.k} is larger than the pool, which has "
                         f"{pool_rows} rows ({files}); choose k <= {pool_rows}")
    eligible = int(np.isfinite(first_scores(scores)).sum())
    if cfg.k > eligible:
        raise InputError(f"{keys.k}: k={cfg.k} is larger than the {eligible} of {pool_rows} "
                         f"pool rows that can be selected (rows with at least "
                         f"{cfg.shortest} word(s), not skipped as bad); lower k"
                         + (" or min_length" if cfg.min_length > 1 else ""))


def _target_mixture(cfg: SelectConfig, target_counts: list[np.ndarray]) -> np.ndarray:
    """The target's n-gram counts for KL: pooled, or each file's distribution mixed by its
    weight and scaled to the targets' total count."""
    total = sum(target_counts)
    if not cfg.target_weights:
        return total
    weights = np.asarray(cfg.target_weights, dtype=np.float64) / sum(cfg.target_weights)
    mix = sum(w * c / max(c.sum(), 1) for w, c in zip(weights, target_counts, strict=False))
    return mix * total.sum()


