"""What a run tells the user: `metrics.jsonl`, a progress display, `summary.json`, `loss.png`."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class MetricsLog:
    """Appends one JSON object per line. On resume, entries after the checkpoint are dropped
    so the file reads as if the run had never been interrupted."""

    def __init__(self, path: Path, *, resume_step: int | None = None, enabled: bool = True):
        self.path = path
        self.enabled = enabled  # False on every process but rank 0 of a multi-process run
        if enabled and resume_step is not None and path.exists():
            kept = [json.dumps(r) for r in self.read() if r.get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        """The records; a line cut short by a killed run is skipped."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records


class ProgressDisplay:
    """A rich progress bar (step, loss, lr, tokens/s, ETA) plus a plain line per log step, so
    the log also reads well when output goes to a file or CI."""

    def __init__(self, *, total_steps: int, start_step: int, enabled: bool = True):
        self.console = Console(stderr=False)
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not (enabled and self.console.is_terminal),
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                           status="")

    def __enter__(self) -> ProgressDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def advance(self, step: int, status: str | None = None) -> None:
        fields = {} if status is None else {"status": status}
        self.progress.update(self.task, completed=step, **fields)

    def log(self, message: str) -> None:
        if self.enabled:
            self.progress.console.print(message, highlight=False, soft_wrap=True)


def format_log_line(record: dict, total_steps: int) -> str:
    parts = [f"step {record['step']:>5}/{total_steps}", f"loss {record['loss']:.4f}",
             f"lr {record['lr']:.2e}", f"grad_norm {record['grad_norm']:.3f}",
             f"{record['tokens_per_s']:,.0f} tok/s"]
    return "  ".join(parts)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def write_summary(path: Path, summary: dict) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")


def plot_losses(records: list[dict], path: Path) -> Path | None:
    """Train loss per logged step and validation loss per evaluation, as a PNG."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=False), label="train loss", color="tab:blue", linewidth=1.4)
    if val:
        ax.plot(*zip(*val, strict=False), label="validation loss", color="tab:orange", marker="o",
                markersize=4, linewidth=1.4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(path.parent.name)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def peak_memory_bytes(device: Any) -> dict:
    """Peak resident memory of this process and, on CUDA, peak allocated device memory."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        peak["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
