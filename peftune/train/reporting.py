"""What a run tells the user: `metrics.jsonl`, a progress display, its first lines (the
numbers it derived) and last ones, `summary.json`, `loss.png`."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from peftune.train.checkpoint import TrainerState
    from peftune.train.setup import BuiltRun


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
    parts = [f"step {record['step']:>5}/{total_steps}", f"loss {record['loss']:.4f}"]
    if "reward_accuracy" in record:  # a pair objective's (train/objectives.py)
        parts += [f"reward acc {record['reward_accuracy']:.0%}",
                  f"margin {record['reward_margin']:.3f}",
                  f"logp chosen {record['chosen_logp']:.1f} rejected {record['rejected_logp']:.1f}"]
    elif "reward_margin" in record:  # kto's
        parts += [f"margin {record['reward_margin']:.3f}", f"kl {record['kl']:.3f}"]
    parts += [f"lr {record['lr']:.2e}", f"grad_norm {record['grad_norm']:.3f}",
              f"{record['tokens_per_s']:,.0f} tok/s"]
    return "  ".join(parts)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def write_summary(path: Path, summary: dict) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")


def plot_losses(records: list[dict], path: Path) -> Path | None:
    """Train loss per logged step and validation loss per evaluation, as a PNG; for a
    preference objective a second panel with the reward accuracy and margin."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = any("reward_margin" in r or "val_reward_margin" in r for r in records)
    if rewards:
        fig, (ax, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
        _plot_rewards(right, records)
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=False), label="train loss", color="tab:blue", linewidth=1.4)
    if val:
        ax.plot(*zip(*val, strict=False), label="validation loss", color="tab:orange", marker="o",
                markersize=4, linewidth=1.4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per pair or completion)" if rewards else "loss (nats per target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(path.parent.name)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_rewards(ax: Any, records: list[dict]) -> None:
    """Reward margin (left axis) and reward accuracy (right axis), train and validation."""
    for prefix, style in (("", "-"), ("val_", "o-")):
        margin = [(r["step"], r[f"{prefix}reward_margin"]) for r in records
                  if f"{prefix}reward_margin" in r]
        if margin:
            ax.plot(*zip(*margin, strict=False), style, color="tab:green", markersize=4,
                    label=f"{'validation' if prefix else 'train'} reward margin")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward margin")
    ax.grid(alpha=0.3)
    accuracy_axis = ax.twinx()
    for prefix, style in (("", "-"), ("val_", "o-")):
        accuracy = [(r["step"], r[f"{prefix}reward_accuracy"]) for r in records
                    if f"{prefix}reward_accuracy" in r]
        if accuracy:
            accuracy_axis.plot(*zip(*accuracy, strict=False), style, color="tab:purple",
                               markersize=4, alpha=0.8,
                               label=f"{'validation' if prefix else 'train'} reward accuracy")
    accuracy_axis.set_ylim(-0.02, 1.02)
    accuracy_axis.set_ylabel("reward accuracy")
    lines = ax.get_legend_handles_labels()
    more = accuracy_axis.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower right")


def peak_memory_bytes(device: Any) -> dict:
    """Peak resident memory of this process and, on CUDA, peak allocated device memory."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024,
            "allocator": allocator()}
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        peak["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ---- the run's first and last lines, and its summary ----------------------------------------

def allocator() -> str:
    from peftune.allocator import current

    return current()


def print_header(built: BuiltRun, display: ProgressDisplay, *, resumed_from: Path | None) -> None:
    """The run's first lines: model, method, device and precision, trainable parameters, the
    data and the tokens per optimizer step, the selection it trained on, the resume."""
    r = built.recipe
    precision = str(built.accelerator.mixed_precision)
    precision = "fp32" if precision == "no" else precision
    procs = built.accelerator.num_processes
    widths = 2 if built.rows and built.rows[0].roles is not None and len(built.rows[0].lengths) > 1 else 1
    tokens_per_step = r.train.batch_size * r.train.grad_accum * procs * r.data.max_length * widths
    lines = [
        f"model {r.model.path}  quant {r.quant.method}  adapter {r.adapter.method}  "
        f"device {built.accelerator.device}  precision {precision}  allocator {allocator()}",
        f"trainable parameters {built.trainable_params:,} "
        f"({100 * built.trainable_params / max(_base_params(built), 1):.2f}% of the base model's "
        f"{_base_params(built):,})",
        _data_line(built) + f"; batch {r.train.batch_size} x accumulation "
        f"{r.train.grad_accum}" + (f" x {procs} processes" if procs > 1 else "") +
        f" = {r.train.batch_size * r.train.grad_accum * procs} rows, "
        f"<= {tokens_per_step:,} tokens per optimizer step; {built.total_steps} steps",
    ]
    init = built.hooks.init_report
    if init:
        details = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in init.items())
        lines.append(f"adapter init ({r.adapter.method}): {details}")
    if built.mix is not None:
        lines.append(built.mix.describe())
    selection = built.data_stats.get("selection")
    if selection is not None:
        reused = "cached, " if selection["cached"] else ""
        lines.append(f"data.select: {selection['method']} chose {selection['k']:,} of "
                     f"{selection['pool_size']:,} rows ({reused}KL reduction "
                     f"{selection['kl_reduction']:.3f}, random {selection['random_kl_reduction']:.3f})"
                     f"; {selection['dir']}")
    if resumed_from is not None:
        lines.append(f"resuming from {resumed_from}")
    for line in lines:
        display.log(line)


def _data_line(built: BuiltRun) -> str:
    """How the training data is laid out in rows (and, for a preference objective, what the
    reference is)."""
    r = built.recipe
    pairs = bool(built.rows) and built.rows[0].roles is not None and len(built.rows[0].lengths) > 1
    if not pairs:
        line = (f"data: {len(built.rows):,} rows of <= {r.data.max_length} tokens "
                f"({'packed' if r.data.packing else 'padded'})")
    else:
        count = sum(len(row.lengths) for row in built.rows) // 2
        line = (f"data: {count:,} pairs in {len(built.rows):,} rows of <= "
                f"{2 * r.data.max_length} tokens ({'packed' if r.data.packing else 'a pair a row'})")
    objective = r.train.objective
    if objective.name != "sft":
        line = f"objective {objective.name}; " + line
        if built.reference is not None:
            spent = f", {built.reference.seconds:.1f}s" if built.reference.seconds else ""
            line = line.replace("; data", f" (reference: {built.reference.mode}{spent}); data", 1)
    return line


def print_footer(display: ProgressDisplay, out: Path, summary: dict) -> None:
    """The run's last lines: steps, time, final losses, and where its files are."""
    loss = summary["final_loss"]
    val = summary["final_val_loss"]
    display.log(
        f"done: {summary['steps']} steps in {summary['train_seconds']:.1f}s, "
        f"final loss {loss:.4f}" + (f", val loss {val:.4f}" if val is not None else "")
    )
    display.log(f"  {Path(summary['artifact']).name + '/':<10} {summary['artifact']}")
    display.log(f"  {'metrics':<10} {out / 'metrics.jsonl'}")
    if summary["plot"]:
        display.log(f"  {'plot':<10} {summary['plot']}")
    display.log(f"  {'summary':<10} {out / 'summary.json'}")
    if (out / "README.md").is_file():
        display.log(f"  {'card':<10} {out / 'README.md'}")
    for name, where in summary.get("trackers", {}).items():  # output.report_to
        display.log(f"  {name:<10} {where['command']}")


def run_summary(built: BuiltRun, state: TrainerState, records: list[dict], artifact: Path,
                plot: Path | None, seconds: float, peak: dict) -> dict:
    """summary.json: what the run trained, how fast, on what, and where its files are."""
    from peftune.models.sources import describe_source

    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    objective: dict[str, Any] = {"name": built.recipe.train.objective.name}
    if built.reference is not None:
        objective.update(reference=built.reference.mode,
                         reference_seconds=round(built.reference.seconds, 3))
    if val and objective["name"] != "sft":  # the last validation's rewards
        objective.update({k: v for k, v in val[-1].items() if k.startswith("val_") and
                          k not in ("val_loss", "val_target_tokens")})
    return {
        "method": built.recipe.adapter.method,
        "objective": objective,
        "steps": state.step,
        "epochs": _epochs_done(built, state),
        "final_loss": train[-1]["loss"] if train else None,
        "final_val_loss": val[-1]["val_loss"] if val else None,
        "tokens": state.tokens,
        "target_tokens": state.target_tokens,
        "train_seconds": round(seconds - state.val_s, 3),  # optimizer steps only
        "val_seconds": round(state.val_s, 3),
        "setup_seconds": round(built.setup_s, 3),
        "tokens_per_s": state.tokens / (seconds - state.val_s) if seconds > state.val_s else None,
        "trainable_params": built.trainable_params,
        "adapter_init": built.hooks.init_report,
        "total_params": built.total_params,
        **peak,
        "artifact": str(artifact),
        "plot": str(plot) if plot else None,
        "data": _data_summary(built, state),
        "model_source": describe_source(built.recipe.model.path),
    }


def _data_summary(built: BuiltRun, state: TrainerState) -> dict:
    """The data numbers, with a data mix's realised draw (`mix`: per source, over the epochs
    the run drew from)."""
    if built.mix is None:
        return built.data_stats
    return {**built.data_stats, "mix": built.mix.report(epochs=state.epoch + 1)}


def _base_params(built: BuiltRun) -> int:
    """The base model's own parameters: the total less an adapter's added ones."""
    from peftune.adapters import get_method

    if get_method(built.recipe.adapter.method).trains_base_weights:
        return built.total_params
    return built.total_params - built.trainable_params


def _epochs_done(built: BuiltRun, state: TrainerState) -> float:
    """Epochs of data consumed, as a fraction (0.21 after a fifth of one)."""
    per_epoch = len(built.batches_for_epoch(state.epoch))
    return round(state.epoch + (state.batch_in_epoch / per_epoch if per_epoch else 0), 4)
