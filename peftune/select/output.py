"""Where a selection goes: the output directory's checks, a temporary directory beside it
that becomes the output only when everything is written, the second pass over the pool that
writes the chosen rows unchanged, the selection's measurements (from the spilled n-grams),
and clean-up when the run is stopped."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from peftune.errors import InputError
from peftune.select.config import SelectConfig
from peftune.select.ngrams import bucket_dtype, segment_positions
from peftune.select.pool import iter_chunks, output_line, parse_lines, parse_payload
from peftune.select.report import LENGTH_CAP
from peftune.select.scoring import first_scores, label_of


def check_out_dir(out: Path, *, overwrite: bool, key: str = "select.out") -> None:
    """Refuse an output directory that is not a new or empty one, unless --overwrite and it
    holds an earlier selection; never the current directory or one that contains it."""
    out = Path(os.path.abspath(out))
    if out.is_symlink() and not out.exists():
        raise InputError(f"{key}: {out} is a link to nothing; choose another path")
    if out.exists() and not out.is_dir():
        raise InputError(f"{key}: {out} exists and is not a directory; choose another path")
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise InputError(f"{key}: {out} is the current directory or contains it; choose a "
                         "new directory for the selection")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"{key}: {out} is not empty; pass --overwrite to replace an "
                             "earlier selection, or choose another directory")
        if not (out / "report.json").is_file():
            raise InputError(f"{key}: {out} is not a selection output (no report.json); "
                             "--overwrite only replaces earlier selections, choose another "
                             "directory")


@contextmanager
def cleanup_on_sigterm() -> Iterator[None]:
    """SIGTERM (a job scheduler, `kill`) unwinds like Ctrl-C, so the temporary output is
    removed; the handler is only installed in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):  # noqa: ARG001 - the signal module's signature
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def make_work_dir(out: Path, *, key: str) -> tuple[Path, Path | None]:
    """A temporary directory beside `out`, and the first parent directory this run had to
    create (removed again if the run fails), or None."""
    created = next((p for p in reversed(out.parents) if not p.exists()), None)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise InputError(f"{key}: cannot write beside {out}: {err.strerror or err}; choose a "
                         "directory you can write to") from None
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary dir
    return work, created


def publish(work: Path, out: Path) -> None:
    """Move the finished files into `out`: an earlier selection there is moved aside first
    and removed only once the new one is in place."""
    old = None
    if out.is_dir():
        old = out.with_name(f"{work.name}-old")
        os.rename(out, old)
    os.rename(work, out)
    work.mkdir()  # the caller's cleanup removes this empty stand-in
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def random_rows(scores: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A uniform random subset of the eligible rows, the baseline the selection is measured
    against."""
    eligible = np.flatnonzero(np.isfinite(first_scores(scores)))
    picked = np.random.default_rng([seed, 1]).choice(eligible, count, replace=False)
    return np.sort(picked)


def write_selection(cfg: SelectConfig, files: list[Path], work: Path, selected: np.ndarray,
                    spans: dict | None = None) -> Counter:
    """Second pass: the chosen rows unchanged, in pool order; returns their label counts.
    `spans` are the JSONL files' chunk spans found by the scoring pass."""
    labels: Counter = Counter()
    with (work / "selected.jsonl").open("wb") as sink:
        for chunk in iter_chunks(files, list(cfg.pool), key="select.pool", lazy=True,
                                 spans=spans):
            chunk.load()
            lo, hi = np.searchsorted(selected, [chunk.first_row,
                                                chunk.first_row + len(chunk.payloads)])
            chosen = [chunk.payloads[i] for i in (selected[lo:hi] - chunk.first_row).tolist()]
            sink.write(b"".join(map(output_line, chosen)))
            if cfg.label_field is not None:
                rows = parse_lines(chosen) if chosen and isinstance(chosen[0], bytes) else None
                rows = rows if rows is not None else list(map(parse_payload, chosen))
                labels.update(label_of(row, cfg.label_field) for row in rows)
    return labels


def measure_spilled(work: Path, chunks: list[tuple[int, int, int]],
                    spill: dict[int, tuple[int, int, int]], selections: list[np.ndarray], *,
                    buckets: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each sorted array of global rows, (summed n-gram counts, histogram of lengths) of
    those rows that are in this rank's `chunks`, read back from the scoring pass's spill of
    every row's n-gram ids: the selection is measured without tokenising it again."""
    dtype = np.dtype(bucket_dtype(buckets))
    counts = [np.zeros(buckets, np.int64) for _ in selections]
    lengths: list[list[np.ndarray]] = [[] for _ in selections]
    for chunk, first_row, rows in chunks:
        wanted = [rows_in(chosen, first_row, first_row + rows) for chosen in selections]
        if not any(len(positions) for positions in wanted):
            continue
        first_gram, grams, spill_row = spill[chunk]
        ids = np.fromfile(work / "spill.ids", dtype=dtype, count=grams,
                          offset=first_gram * dtype.itemsize)
        per_row = np.fromfile(work / "spill.rows", dtype=np.int64, count=2 * rows,
                              offset=spill_row * 16).reshape(rows, 2)
        sizes, words = per_row[:, 0], per_row[:, 1]
        starts = np.cumsum(sizes) - sizes
        for total, found, positions in zip(counts, lengths, wanted, strict=True):
            total += np.bincount(ids[segment_positions(starts[positions], sizes[positions])],
                                 minlength=buckets)
            found.append(words[positions])
    return [(total, np.bincount(np.minimum(np.concatenate([np.zeros(0, np.int64), *found]),
                                           LENGTH_CAP), minlength=LENGTH_CAP + 1))
            for total, found in zip(counts, lengths, strict=True)]


def rows_in(rows: np.ndarray, start: int, end: int) -> np.ndarray:
    """Positions within [start, end) of the sorted global `rows`."""
    lo, hi = np.searchsorted(rows, [start, end])
    return rows[lo:hi] - start
