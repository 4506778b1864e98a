"""What an evaluation leaves: `report.json` (every metric with its sample count, the
config, each model's identity, timings, deltas), `predictions.jsonl` (one line per model,
task and example), `metrics.png` (a bar chart, when several models are compared), a table
on the terminal, and a progress bar with examples/s while it runs."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from peftune.errors import InputError

# Metrics where lower is better (the delta's sign reads the other way round).
LOWER_IS_BETTER = {"loss", "perplexity", "bits_per_byte"}
NOT_COMPARED = {"tokens", "answered", "chosen_length", "rejected_length"}
# Metrics with no better direction (a preference objective may lower both log-probs): their
# deltas are shown uncoloured.
UNDIRECTED = {"chosen_logp", "rejected_logp", "chosen_reward", "rejected_reward",
              "answer_tokens"}


def check_out_dir(out: Path, *, overwrite: bool) -> None:
    """A new or empty directory, or (with --overwrite) an earlier evaluation's."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"--out {out}: is not empty; pass --overwrite to replace an "
                             "earlier evaluation, or choose another --out")
        if not (out / "report.json").is_file():
            raise InputError(f"--out {out}: not an evaluation output (no report.json); "
                             "--overwrite only replaces earlier evaluations, choose another --out")


def deltas(models: list[dict]) -> dict:
    """For each model after the first: the first model's value minus its value, per task
    and metric (positive = the target has more of it; see LOWER_IS_BETTER)."""
    if len(models) < 2:
        return {}
    first = models[0]["tasks"]
    out: dict[str, Any] = {}
    for other in models[1:]:
        per_task = {}
        for task, result in first.items():
            theirs = other["tasks"].get(task, {}).get("metrics", {})
            per_task[task] = {name: metric["value"] - theirs[name]["value"]
                              for name, metric in result["metrics"].items()
                              if name in theirs and name not in NOT_COMPARED}
        out[f"{models[0]['label']} - {other['label']}"] = per_task
    return out


def write_outputs(out: Path, report: dict, predictions: list[dict]) -> dict:
    """Write everything into a temporary directory beside `out`, then put it in place."""
    out = Path(out)
    created = next((p for p in reversed(out.parents) if not p.exists()), None)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        files = {"report": str(out / "report.json"), "predictions": str(out / "predictions.jsonl")}
        with (work / "predictions.jsonl").open("w") as handle:
            for line in predictions:
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        if len(report["models"]) > 1 and plot_metrics(report, work / "metrics.png"):
            files["plot"] = str(out / "metrics.png")
        report = {**report, "files": files}
        (work / "report.json").write_text(json.dumps(report, indent=2, default=_json) + "\n")
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return files


def _json(value: Any) -> Any:
    return str(value)


def metric_names(models: list[dict], task: str) -> list[str]:
    """The task's metrics over all models, in order of appearance: a model may lack some (a
    base has no reward against itself)."""
    names: list[str] = []
    for model in models:
        for name in model["tasks"].get(task, {}).get("metrics", {}):
            if name not in names:
                names.append(name)
    return names


def _metric(model: dict, task: str, name: str) -> dict | None:
    return model["tasks"].get(task, {}).get("metrics", {}).get(name)


def _fmt(name: str, value: float) -> str:
    if name == "tokens":
        return f"{int(value):,}"
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return str(value)
    if name in ("perplexity",) and abs(value) >= 100:
        return f"{value:,.1f}"
    return f"{value:.4f}"


def print_table(report: dict, out: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    models = report["models"]
    delta_names = list(report["deltas"])
    caption = (f"Δ X = {models[0]['label']} minus X; green: {models[0]['label']} is better"
               if delta_names else None)
    table = Table(title="peftune eval", caption=caption)
    table.add_column("task", no_wrap=True)
    table.add_column("metric", no_wrap=True)
    table.add_column("n", justify="right")
    for model in models:
        table.add_column(model["label"], justify="right", no_wrap=True)
    for model in models[1:]:
        table.add_column(f"Δ {model['label']}", justify="right", no_wrap=True)
    for task in models[0]["tasks"]:
        for metric in metric_names(models, task):
            found = [_metric(m, task, metric) for m in models]
            first = next(m for m in found if m is not None)
            cells = ["-" if m is None else _fmt(metric, m["value"]) for m in found]
            signs = []
            for name in delta_names:
                delta = report["deltas"][name][task].get(metric)
                if delta is None:
                    signs.append("")
                    continue
                better = (delta < 0) if metric in LOWER_IS_BETTER else (delta > 0)
                colour = "green" if better else ("red" if delta != 0 else "white")
                colour = "white" if metric in UNDIRECTED else colour
                shown = f"{delta:+,.1f}" if abs(delta) >= 100 else f"{delta:+.4f}"
                signs.append(f"[{colour}]{shown}[/{colour}]")
            table.add_row(task, metric, f"{first['n']:,}", *cells, *signs)
    console = Console()
    if not console.is_terminal:  # a log file: as wide as the table needs
        console = Console(width=max(console.width, 160))
    console.print(table)
    for model in models:
        speeds = ", ".join(f"{task} {r['examples_per_s'] or 0:,.1f} ex/s"
                           for task, r in model["tasks"].items())
        console.print(f"{model['label']}: loaded in {model['load_seconds']:.1f}s; {speeds}",
                      highlight=False)
    if out is not None:
        for name, path in report.get("files", {}).items():
            console.print(f"  {name:<12} {path}", highlight=False)


def plot_metrics(report: dict, path: Path) -> Path | None:
    """One panel per (task, metric), one bar per model; None when no metric compares (a
    generate task over prompts without references)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    panels = [(task, metric) for task in models[0]["tasks"]
              for metric in metric_names(models, task) if metric not in NOT_COMPARED]
    if not panels:
        return None
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.0 * rows), dpi=110,
                             squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = [m["label"] for m in models]
    for ax, (task, metric) in zip(axes.flat, panels, strict=False):
        found = [_metric(m, task, metric) for m in models]
        values = [math.nan if m is None else m["value"] for m in found]  # nan: no bar
        bars = ax.bar(range(len(models)), values, color=colours[:len(models)])
        ax.bar_label(bars, labels=["" if m is None else _fmt(metric, m["value"]) for m in found],
                     fontsize=7)
        ax.set_xticks(range(len(models)), labels, rotation=20, fontsize=8)
        arrow = "" if metric in UNDIRECTED else (
            " (↓ better)" if metric in LOWER_IS_BETTER else " (↑ better)")
        ax.set_title(f"{task}: {metric}{arrow}", fontsize=9)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class Progress:
    """A rich progress bar of examples with examples/s; nothing when output is not a
    terminal or when disabled (quiet, ranks other than 0)."""

    def __init__(self, title: str, *, total: int, enabled: bool):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        console = Console()
        self.bar = RichProgress(
            TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
            console=console, transient=True, disable=not (enabled and console.is_terminal))
        self.task = self.bar.add_task(title, total=total, rate="")
        self.done = 0

    def __enter__(self) -> Progress:
        import time

        self.start = time.perf_counter()
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def advance(self, n: int) -> None:
        import time

        self.done += n
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(self.task, completed=self.done, rate=f"{rate:,.1f} examples/s")
