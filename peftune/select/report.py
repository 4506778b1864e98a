"""What a selection tells the user: progress with docs/s, `report.json`, a final table, and
`scores.png` (the score histogram with the selection marked, and lengths against the pool's).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from peftune.recipe.yamlfile import dump_yaml
from peftune.select.config import DSIR_KEYS, ZIPFIT_KEYS, SelectConfig
from peftune.select.kl import ALPHA
from peftune.select.scoring import first_scores

LENGTH_CAP = 1 << 16  # lengths (words) above this share the last histogram bin


def length_summary(hist: np.ndarray) -> dict[str, float]:
    """Count, mean and quantiles of word-punct lengths from a histogram of lengths."""
    count = int(hist.sum())
    if count == 0:
        return {"count": 0}
    cumulative = np.cumsum(hist)
    lengths = np.arange(len(hist))

    def quantile(q: float) -> int:
        return int(np.searchsorted(cumulative, q * count, side="left"))

    return {"count": count, "mean": float((hist * lengths).sum() / count),
            "p10": quantile(0.10), "p50": quantile(0.50), "p90": quantile(0.90),
            "max": int(lengths[hist > 0].max())}


def build_report(cfg: SelectConfig, *, pool_rows: int, target_rows: list[int],
                 zipfit_targets: int | None, timings: dict[str, float], kl: dict[str, float],
                 pool_labels: Counter, selected_labels: Counter, pool_lengths: dict,
                 selected_lengths: dict, scores: np.ndarray, selected: np.ndarray,
                 processes: int, world: int, skipped_rows: int = 0) -> dict[str, Any]:
    """The report; with several weighted DSIR targets, `scores` summarises the first
    target's column of scores.npy."""
    first = first_scores(scores)
    eligible = int(np.isfinite(first).sum())
    chosen = first[selected]
    report: dict[str, Any] = {
        "method": cfg.method,
        "k": int(len(selected)),
        "pool_size": pool_rows,
        "eligible": eligible,
        "skipped_rows": skipped_rows,
        "pool": list(cfg.pool),
        "target": [{"file": f, "rows": n} for f, n in zip(cfg.target, target_rows, strict=False)],
        "seed": cfg.seed,
        "min_length": cfg.min_length,
        "method_keys": cfg.method_keys(),
        "processes": processes,
        "ranks": world,
        "timings": {name: round(seconds, 4) for name, seconds in timings.items()},
        "docs_per_s": round(pool_rows / max(timings["score"], 1e-9), 1),
        "kl": {**kl, "features": f"hashed {cfg.ngrams}-grams, {cfg.buckets} buckets, "
                                 f"{cfg.hash}",
               "smoothing": f"Laplace, {ALPHA:g} count added per bucket, for all distributions"},
        "scores": {"min": _finite(np.nanmin(first)) if len(first) else None,
                   "max": _finite(np.nanmax(first)) if len(first) else None,
                   "selected_min": _finite(chosen.min()) if len(chosen) else None},
        "lengths": {"unit": "word-punct tokens", "pool": pool_lengths,
                    "selected": selected_lengths},
    }
    if zipfit_targets is not None:
        pairs = eligible * zipfit_targets  # rows below min_length are not compressed
        report["zipfit_targets"] = zipfit_targets
        report["pairs"] = pairs
        report["pairs_per_s"] = round(pairs / max(timings["score"], 1e-9), 1)
    if cfg.label_field is not None:
        report["labels"] = {"field": cfg.label_field, "pool": dict(pool_labels.most_common()),
                            "selected": dict(selected_labels.most_common())}
    return report


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def select_yaml(cfg: SelectConfig) -> str:
    """The resolved `select:` block, runnable again with `peftune select-data FILE`."""
    foreign = ZIPFIT_KEYS if cfg.method == "dsir" else DSIR_KEYS
    values = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in foreign}
    header = ("# The resolved settings of this selection (paths relative to where it ran).\n"
              "# Run again with: peftune select-data select.yaml select.out=NEW_DIR\n")
    return header + dump_yaml({"select": values})


def plot_scores(path: Path, scores: np.ndarray, selected: np.ndarray, cfg: SelectConfig) -> None:
    """Histogram of every row's score (first target's, with several weighted targets) with
    the selected rows' scores over it. The range leaves out the lowest 0.1% of scores, which
    would otherwise squeeze the interesting part into a few bins; the title counts them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    first = first_scores(scores)
    finite = first[np.isfinite(first)]
    chosen = first[selected]
    fig, ax = plt.subplots(figsize=(7.5, 4), dpi=110)
    low = float(np.quantile(finite, 0.001)) if len(finite) else 0.0
    if len(chosen) and np.isfinite(chosen).any():
        low = min(low, float(np.nanmin(chosen)))
    hidden = int((finite < low).sum())
    finite = finite[finite >= low]
    bins = np.histogram_bin_edges(finite, bins=60) if len(finite) else np.linspace(0, 1, 11)
    # Filled steps over np.histogram draw what ax.hist draws, as one shape instead of a
    # patch per bin (half the plot's time).
    ax.stairs(np.histogram(finite, bins)[0], bins, fill=True, color="tab:gray", alpha=0.6,
              label=f"pool ({len(finite):,} rows)")
    ax.stairs(np.histogram(chosen[np.isfinite(chosen)], bins)[0], bins, fill=True,
              color="tab:blue", alpha=0.8, label=f"selected ({len(chosen):,})")
    if len(chosen):
        hard = cfg.method == "zipfit" or cfg.sampling == "top_k"
        what = "threshold" if hard else "lowest selected"
        ax.axvline(np.nanmin(chosen), color="tab:red", linestyle="--",
                   label=f"{what} {np.nanmin(chosen):.4g}")
    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(NullLocator())  # a tick per decade reads as well, and draws faster
    what = "log importance weight" if cfg.method == "dsir" else "1 - mean NCD"
    ax.set_xlabel(f"{cfg.method} score ({what})")
    ax.set_ylabel("rows")
    title = f"{cfg.method}: k={len(chosen):,} of {len(first):,}"
    if cfg.method == "dsir" and cfg.sampling == "gumbel":
        title += " (Gumbel sampling: no hard threshold)"
    if hidden:
        title += f"\n{hidden:,} pool rows below {low:.4g} not shown"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    # Fixed margins (room for a two-line title): tight_layout would draw the figure twice.
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.12, top=0.84 if hidden else 0.9)
    fig.savefig(path)
    plt.close(fig)


class PlotThread:
    """scores.png drawn on a thread of this process, off the run's critical path:
    matplotlib's import (~0.3 s of CPU) runs while the pool is scored (`warm`, once the
    worker processes exist, so that no fork copies a running thread), and the drawing while
    the selection is written (`draw`); `wait` returns once the file is written, or raises
    what went wrong."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None

    def warm(self) -> None:
        if not self._threads:
            self._start(_import_pyplot)

    def draw(self, path: Path, scores: np.ndarray, selected: np.ndarray,
             cfg: SelectConfig) -> None:
        self.warm()
        self._start(plot_scores, path, scores, selected, cfg)

    def wait(self) -> None:
        for thread in self._threads:
            thread.join()
        if self._error is not None:
            raise self._error

    def _start(self, work: Any, *args: Any) -> None:
        before = self._threads[-1] if self._threads else None

        def run() -> None:
            if before is not None:
                before.join()
            try:
                work(*args)
            except BaseException as err:  # noqa: BLE001 - raised again by wait()
                self._error = err

        thread = threading.Thread(target=run, name="peftune-plot", daemon=True)
        thread.start()
        self._threads.append(thread)


def _import_pyplot() -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401 - the import is what this warms up
    except Exception:  # noqa: BLE001, S110 - plot_scores raises it again, reported then
        pass


class Reporter:
    """Progress during the scoring pass (rows, docs/s) and the final table."""

    def __init__(self, *, quiet: bool):
        self.console = Console(stderr=True)
        self.quiet = quiet
        self.progress: Progress | None = None
        self.rows = 0
        self.started = time.perf_counter()

    def start_pass(self, files: list[Path], *, processes: int, world: int) -> None:
        if self.quiet:
            return
        total = sum(p.stat().st_size for p in files) \
            if all(p.is_file() and p.suffix.lower() == ".jsonl" for p in files) else None
        self.progress = Progress(
            TextColumn("[bold]scoring"), BarColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), console=self.console, transient=True,
            disable=not self.console.is_terminal)
        self.progress.start()
        self.task = self.progress.add_task("score", total=total, status="")
        self.started = time.perf_counter()
        where = f"{processes} process{'es' if processes > 1 else ''}"
        if world > 1:
            where += f" on each of {world} ranks"
        Console().print(f"scoring {', '.join(map(str, files))} with {where}", highlight=False,
                        soft_wrap=True)

    def advance(self, rows: int, nbytes: int) -> None:
        self.rows += rows
        if self.progress is not None:
            rate = self.rows / max(time.perf_counter() - self.started, 1e-9)
            self.progress.update(self.task, advance=nbytes,
                                 status=f"{self.rows:,} docs  {rate:,.0f} docs/s")

    def end_pass(self) -> None:
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def finish(self, report: dict, out: Path) -> None:
        if self.quiet:
            return
        table = Table(title=f"{report['method']} selection", show_header=False)
        table.add_column("what", style="bold")
        table.add_column("value")
        kl = report["kl"]
        t = report["timings"]
        table.add_row("selected", f"{report['k']:,} of {report['pool_size']:,} rows")
        table.add_row("time", f"{t['total']:.1f} s  (score {t['score']:.1f} s, "
                              f"{report['docs_per_s']:,.0f} docs/s)")
        if "pairs_per_s" in report:
            table.add_row("pairs", f"{report['pairs_per_s']:,.0f} compressions/s "
                                   f"against {report['zipfit_targets']:,} targets")
        gain = kl["reduction"] - kl["random_reduction"]
        table.add_row("closer to the target",
                      f"{gain:+.4f} nats than random rows of the same size "
                      f"({'better' if gain > 0 else 'not better'} than chance)")
        table.add_row("KL reduction", f"{kl['reduction']:.4f} nats, random rows "
                                      f"{kl['random_reduction']:.4f} (KL(target||pool) - "
                                      "KL(target||selection) on hashed n-grams; it is negative "
                                      "for any small sample, so compare it with random's)")
        lengths = report["lengths"]
        if lengths["pool"].get("count") and lengths["selected"].get("count"):
            table.add_row("median length", f"{lengths['selected']['p50']} words selected, "
                                           f"{lengths['pool']['p50']} in the pool")
        if "labels" in report:
            pool, k = report["labels"]["pool"], max(report["k"], 1)
            total = max(sum(pool.values()), 1)
            mix = ", ".join(f"{label} {n:,} ({n / k:.0%}; pool {pool.get(label, 0) / total:.0%})"
                            for label, n in list(report["labels"]["selected"].items())[:5])
            table.add_row("labels", mix)
        if report.get("skipped_rows"):
            table.add_row("skipped", f"{report['skipped_rows']:,} bad rows (on_bad_row: skip)")
        console = Console()
        console.print(table)
        console.print(f"wrote {out}/: selected.jsonl, scores.npy, report.json, scores.png, "
                      "select.yaml", highlight=False, soft_wrap=True)
