"""Where a selection goes: the output directory's checks, a temporary directory beside it
that becomes the output only when everything is written, the second pass over the pool that
writes the chosen rows unchanged, and clean-up when the run is stopped."""

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
from peftune.select.ngrams import NgramHasher
from peftune.select.pool import TextRule, iter_chunks, output_line, parse_payload
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
                     random_rows: np.ndarray, hasher: NgramHasher) -> dict:
    """Second pass: the chosen rows unchanged, in pool order, and what the selection and the
    random baseline look like (n-gram counts, labels, lengths)."""
    rule = TextRule.for_pool(cfg)
    selected_counts = np.zeros(hasher.buckets, np.int64)
    random_counts = np.zeros(hasher.buckets, np.int64)
    length_hist = np.zeros(LENGTH_CAP + 1, np.int64)
    labels: Counter = Counter()
    batches: dict[str, list[str]] = {"selected": [], "random": []}

    def measure(final: bool = False) -> None:
        for name, counts in (("selected", selected_counts), ("random", random_counts)):
            texts = batches[name]
            if texts and (final or len(texts) >= 4096):
                ids, _, words = hasher.featurize(texts)
                counts += np.bincount(ids, minlength=hasher.buckets)
                if name == "selected":
                    length_hist[:] += np.bincount(np.minimum(words, LENGTH_CAP),
                                                  minlength=LENGTH_CAP + 1)
                texts.clear()

    with (work / "selected.jsonl").open("wb") as sink:
        for chunk in iter_chunks(files, list(cfg.pool), key="select.pool"):
            end = chunk.first_row + len(chunk.payloads)
            chosen = rows_in(selected, chunk.first_row, end)
            baseline = rows_in(random_rows, chunk.first_row, end)
            for position in sorted(chosen | baseline):
                payload = chunk.payloads[position]
                row = parse_payload(payload)
                text = rule.text(row)
                if position in baseline:
                    batches["random"].append(text)
                if position in chosen:
                    sink.write(output_line(payload))
                    batches["selected"].append(text)
                    if cfg.label_field is not None:
                        labels[label_of(row, cfg.label_field)] += 1
            measure()
    measure(final=True)
    return {"selected_counts": selected_counts, "random_counts": random_counts,
            "labels": labels, "length_hist": length_hist}


def rows_in(rows: np.ndarray, start: int, end: int) -> set[int]:
    """Positions within [start, end) of the sorted global `rows`."""
    lo, hi = np.searchsorted(rows, [start, end])
    return set((rows[lo:hi] - start).tolist())
