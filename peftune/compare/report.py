"""What a comparison shows: the plan and progress, a rich table, compare.md and compare.png.

Every figure comes from the report's rows, which copy each run's summary.json unchanged.
"""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

_COLUMNS = ("method", "trainable", "{memory}", "tokens/s", "train loss", "val loss", "train s",
            "total s", "status")


def print_plan(report: dict) -> None:
    """What will train, on what, and which recipe keys each method leaves out or changes."""
    console = Console(highlight=False, markup=False)
    console.print(f"compare {len(report['methods'])} methods ({', '.join(report['methods'])}) "
                  f"on {report['recipe']}: {_steps(report)}, seed {report['seed']}, same data; "
                  f"into {report['out']}", soft_wrap=True)
    for line in _notes(report):
        console.print(f"  {line}", soft_wrap=True)


def print_running(report: dict, index: int) -> None:
    """The line that says which method trains now: `method 2/4: dora`."""
    title = f"method {index + 1}/{len(report['rows'])}: {report['rows'][index]['method']}"
    Console(highlight=False, markup=False).rule(title)


def print_failed(row: dict) -> None:
    Console(highlight=False, markup=False, stderr=True).print(
        f"{row['method']} failed: {row['error']}", style="red", soft_wrap=True)


def print_table(report: dict) -> None:
    """The figures in a table that fits 80 columns; each failure's error on a line below."""
    console = Console(highlight=False, markup=False)
    table = Table(title=f"peftune compare: {report['recipe']}", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, collapse_padding=True)
    for index, column in enumerate(_COLUMNS):
        header = column.format(memory=_memory_name(report)).replace(" ", "\n")
        table.add_column(header, no_wrap=True,
                         justify="left" if index in (0, len(_COLUMNS) - 1) else "right")
    for row in report["rows"]:
        cells = _cells(row, report)[:-1]
        table.add_row(*cells, Text(row["status"], style="" if row["status"] == "ok" else "red"))
    console.print(table)
    for row in report["rows"]:
        if row["status"] != "ok":
            console.print(f"  {row['method']} {row['status']}: {row['error']}", soft_wrap=True)
    out = Path(report["out"])
    for name in ("compare.json", "compare.md", "compare.png"):
        console.print(f"  {name:<13} {out / name}")


def write_report(report: dict, out: Path) -> None:
    """compare.md and compare.png (the runner keeps compare.json up to date itself)."""
    (out / "compare.md").write_text(markdown(report))
    plot(report, out / "compare.png")


def markdown(report: dict) -> str:
    columns = [c.format(memory=_memory_name(report)) for c in _COLUMNS]
    lines = [
        f"# peftune compare: {report['recipe']}", "",
        f"Model `{report['model']}`, data `{report['data']['train']}`"
        + (f" (validation `{report['data']['val']}`)" if report["data"]["val"] else "")
        + f"; {_steps(report)} and seed {report['seed']} for every method"
        + (f"; overrides `{' '.join(report['overrides'])}`" if report["overrides"] else "")
        + ".", "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if i in (0, len(columns) - 1) else "---:"
                       for i in range(len(columns))) + "|",
    ]
    for row in report["rows"]:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(row, report)) + " |")
    lines.append("")
    lines += [f"- {line}" for line in _notes(report)]
    lines += ["- Figures are those in each run's `summary.json` (`<method>/summary.json`); "
              "train s is the training loop, total s adds the process start, model load and "
              "export.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Bar charts per method: final train/val loss, trainable parameters (log), tokens/s and
    peak memory. A failed method keeps its place, marked "failed"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [row["method"] for row in rows]
    x = list(range(len(rows)))
    colors = [plt.get_cmap("tab10")(i % 10) for i in x]
    fig, axes = plt.subplots(2, 2, figsize=(max(8, 1.3 * len(rows) + 5), 7), dpi=110)
    loss_ax, params_ax, speed_ax, memory_ax = axes.flat

    # Points, not bars: bars from zero would hide differences in the second decimal.
    for key, label, marker, shift in (("final_loss", "train", "o", -0.15),
                                      ("final_val_loss", "validation", "s", 0.15)):
        points = [(i + shift, row[key]) for i, row in zip(x, rows, strict=True)
                  if row[key] is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            loss_ax.plot(xs, ys, marker, color="black", markersize=7, label=label,
                         markerfacecolor="black" if label == "train" else "white",
                         linestyle="none")
            for i, y in points:
                loss_ax.annotate(f"{y:.3f}", (i, y), textcoords="offset points", fontsize=7,
                                 xytext=(-6 if shift < 0 else 6, -3),
                                 ha="right" if shift < 0 else "left")
    loss_ax.legend(fontsize=8)
    loss_ax.set_title("final loss (nats per target token)")
    _bars(params_ax, x, [row["trainable_params"] for row in rows], colors, 0.7, "{:,}")
    params_ax.set_yscale("log")
    params_ax.set_title("trainable parameters (log scale)")
    _bars(speed_ax, x, [row["tokens_per_s"] for row in rows], colors, 0.7, "{:,.0f}")
    speed_ax.set_title("tokens / s (training)")
    memory = _memory_key(report)
    _bars(memory_ax, x, [None if row[memory] is None else row[memory] / 2**20 for row in rows],
          colors, 0.7, "{:,.0f}")
    memory_ax.set_title(f"{_memory_name(report)} (MiB)")
    for ax in axes.flat:
        ax.set_xticks(x, names, rotation=30 if len(rows) > 5 else 0)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
        for i, row in enumerate(rows):
            if row["status"] != "ok":
                ax.text(i, 0.02, row["status"], transform=ax.get_xaxis_transform(),
                        ha="center", color="tab:red", fontsize=9)
    fig.suptitle(f"peftune compare: {Path(report['recipe']).name} ({_steps(report)}, "
                 f"seed {report['seed']})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _bars(ax, x, values, colors, width, fmt, **style) -> None:
    shown = [(i, v, c) for i, v, c in zip(x, values, colors, strict=True) if v is not None]
    if not shown:
        return
    xs, heights, cs = zip(*shown, strict=True)
    bars = ax.bar(xs, heights, width=width, color=cs, edgecolor="black", linewidth=0.5, **style)
    ax.bar_label(bars, labels=[fmt.format(h) for h in heights], fontsize=7, padding=2)


def _cells(row: dict, report: dict) -> list[str]:
    def num(key: str, fmt: str) -> str:
        return "-" if row[key] is None else fmt.format(row[key])

    memory = row[_memory_key(report)]
    status = "ok" if row["status"] == "ok" else f"{row['status']}: {row['error'] or ''}".strip()
    return [row["method"], num("trainable_params", "{:,}"),
            "-" if memory is None else _bytes(memory), num("tokens_per_s", "{:,.0f}"),
            num("final_loss", "{:.4f}"), num("final_val_loss", "{:.4f}"),
            _seconds(row["train_seconds"]), _seconds(row["wall_seconds"]), status]


def _notes(report: dict) -> list[str]:
    notes = []
    for row in report["rows"]:
        if row["dropped_keys"]:
            notes.append(f"{row['method']}: dropped {', '.join(row['dropped_keys'])} (not "
                         f"keys of {row['method']})")
        if row["overrides"]:
            notes.append(f"{row['method']}: --set {' '.join(row['overrides'])}")
    return notes


def _memory_key(report: dict) -> str:
    """Peak CUDA allocation when the runs had a GPU, else the process's peak RSS."""
    cuda = any(row.get("peak_cuda_allocated_bytes") is not None for row in report["rows"])
    return "peak_cuda_allocated_bytes" if cuda else "peak_rss_bytes"


def _memory_name(report: dict) -> str:
    return "peak CUDA alloc" if _memory_key(report) == "peak_cuda_allocated_bytes" else "peak RSS"


def _bytes(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:,.0f} MiB"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:,.1f}"


def _steps(report: dict) -> str:
    if report["steps"] is not None:
        return f"{report['steps']} steps"
    return f"{report['epochs']:g} epochs"
