"""What a comparison or a sweep shows: the plan and progress, a rich table, compare.md and
compare.png; a sweep (axis "grid") has a column per grid key and names its best run.

Every figure comes from the report's rows, which copy each run's summary.json unchanged.
"""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text


def print_plan(report: dict) -> None:
    """What will train, on what, and which recipe keys each run leaves out or changes."""
    console = Console(highlight=False, markup=False)
    names = [_label(row, report) for row in report["rows"]]
    fixed = f" with {_fixed(report)}" if _fixed(report) else ""
    what = (f"sweep {len(names)} runs ({_grid(report)})" if report["axis"] == "grid"
            else f"compare {len(names)} {report['axis']}s ({', '.join(names)})")
    console.print(f"{what}{fixed} on {report['recipe']}: {_steps(report)}, seed {report['seed']}, same data; "
                  f"into {report['out']}", soft_wrap=True)
    for line in _notes(report):
        console.print(f"  {line}", soft_wrap=True)


def print_running(report: dict, index: int) -> None:
    """The line that says which run trains now: `method 2/4: dora`, `objective 1/3: dpo`,
    `run 3/4: lr=1e-4,r=16`."""
    noun = "run" if report["axis"] == "grid" else report["axis"]
    title = (f"{noun} {index + 1}/{len(report['rows'])}: "
             f"{_label(report['rows'][index], report)}")
    Console(highlight=False, markup=False).rule(title)


def print_failed(row: dict, report: dict) -> None:
    Console(highlight=False, markup=False, stderr=True).print(
        f"{_label(row, report)} failed: {row['error']}", style="red", soft_wrap=True)


def print_table(report: dict) -> None:
    """The figures in a table that fits 80 columns (for preference objectives without
    tokens/s and total s, which compare.md keeps: train s tells the speed of the same steps);
    each failure's error on a line below."""
    console = Console(highlight=False, markup=False)
    table = Table(title=f"peftune {_verb(report)}: {report['recipe']}", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, collapse_padding=True)
    columns = _columns(report)
    shown = [i for i, column in enumerate(columns)
             if not (column in ("tokens/s", "total s") and _preference(report))]
    if report["axis"] == "grid":  # `lr`, not `train.lr`: the table fits 80 columns
        from peftune.compare.grid import short_keys

        columns[:len(report["grid"])] = short_keys(list(report["grid"])).values()
    for index in shown:
        table.add_column(columns[index].replace(" ", "\n"), no_wrap=True,
                         justify="left" if _left(index, columns, report) else "right")
    for row in report["rows"]:
        cells = _cells(row, report)
        table.add_row(*(cells[i] for i in shown[:-1]),
                      Text(row["status"], style="" if row["status"] == "ok" else "red"))
    console.print(table)
    for row in report["rows"]:
        if row["status"] != "ok":
            console.print(f"  {_label(row, report)} {row['status']}: {row['error']}",
                          soft_wrap=True)
    out = Path(report["out"])
    for name in ("compare.json", "compare.md", "compare.png"):
        console.print(f"  {name:<13} {out / name}")
    if report["axis"] == "grid":
        console.print(_best(report), soft_wrap=True)
        if report["best"] is not None:
            console.print(f"  {report['best']['command']}", soft_wrap=True)


def write_report(report: dict, out: Path) -> None:
    """compare.md and compare.png (the runner keeps compare.json up to date itself)."""
    (out / "compare.md").write_text(markdown(report))
    plot(report, out / "compare.png")


def markdown(report: dict) -> str:
    columns = _columns(report)
    lines = [
        f"# peftune {_verb(report)}: {report['recipe']}", "",
        f"Model `{report['model']}`, data `{report['data']['train']}`"
        + (f" (validation `{report['data']['val']}`)" if report["data"]["val"] else "")
        + f"; {_steps(report)} and seed {report['seed']}"
        + (f", {_fixed(report)}" if _fixed(report) else "") + " for every run"
        + (f"; overrides `{' '.join(report['overrides'])}`" if report["overrides"] else "")
        + "." + (f" Grid {_grid(report)}, sorted by {_ranked_by(report)} (failed runs last)."
                 if report["axis"] == "grid" else ""), "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if _left(i, columns, report) else "---:"
                       for i in range(len(columns))) + "|",
    ]
    for row in report["rows"]:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(row, report)) + " |")
    lines.append("")
    lines += [f"- {line}" for line in _notes(report)]
    if _preference(report):
        lines.append("- val reward acc is the share of validation pairs whose chosen response "
                     "gets the higher reward, val reward margin the mean chosen-minus-rejected "
                     "reward, each as its objective defines the reward (summary.json's "
                     "`objective` block). Losses and margins are each objective's own "
                     "quantity (formula and beta); accuracy compares across objectives."
                     + ("" if report["data"]["val"] else " The recipe has no data.val, so "
                        "there are no validation rewards: give one to fill these columns."))
    if report["axis"] == "grid":
        best = report["best"]
        lines.append(f"- {_best(report)}" + (f": `{best['command']}`" if best else ""))
    run = "run" if report["axis"] == "grid" else report["axis"]
    lines += [f"- Figures are those in each run's `summary.json` (`<{run}>/"
              "summary.json`); train s is the training loop, total s adds the process start, "
              "model load and export.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Charts per run: final train/val loss; the trainable parameters (log) when the methods
    differ; validation reward accuracy and margin for preference objectives; tokens/s, peak
    memory, and training time when the objectives differ. A failed run keeps its place,
    marked "failed"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [_label(row, report) for row in rows]
    x = list(range(len(rows)))
    colors = [plt.get_cmap("tab10")(i % 10) for i in x]
    memory = _memory_key(report)
    panels = [("trainable_params", "trainable parameters (log scale)", "{:,}", 1)
              ] if _adapter_varies(report) else []
    if _preference(report):
        panels += [("val_reward_accuracy", "validation reward accuracy", "{:.0%}", 1),
                   ("val_reward_margin", "validation reward margin", "{:.3f}", 1)]
    if report["axis"] == "objective":
        panels.append(("train_seconds", "training time (s)", "{:,.1f}", 1))
    panels += [("tokens_per_s", "tokens / s (training)", "{:,.0f}", 1),
               (memory, f"{_memory_name(report)} (MiB)", "{:,.0f}", 2**20)]
    ncols = (len(panels) + 2) // 2
    fig, axes = plt.subplots(2, ncols, figsize=(max(4 * ncols, 1.3 * len(rows) * ncols / 2 + 5),
                                                7), dpi=110)
    loss_ax, *others = axes.flat

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
    loss_ax.set_title("final loss (each objective's own)" if report["axis"] == "objective"
                      else "final loss (per pair or completion)" if _preference(report)
                      else "final loss (nats per target token)")
    for ax, (key, title, fmt, unit) in zip(others, panels, strict=False):
        _bars(ax, x, [_scaled(row.get(key), unit) for row in rows],
              colors, 0.7, fmt)
        ax.set_title(title)
        if key == "trainable_params":
            ax.set_yscale("log")
    for ax in others[len(panels):]:
        ax.set_visible(False)
    for ax in axes.flat[: len(panels) + 1]:
        ax.set_xticks(x, names, rotation=30 if len(rows) > (2 if report["axis"] == "grid" else 5)
                      else 0, ha="right" if report["axis"] == "grid" and len(rows) > 2
                      else "center")
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
        for i, row in enumerate(rows):
            if row["status"] != "ok":
                ax.text(i, 0.02, row["status"], transform=ax.get_xaxis_transform(),
                        ha="center", color="tab:red", fontsize=9)
    fig.suptitle(f"peftune {_verb(report)}: {Path(report['recipe']).name} ({_steps(report)}, "
                 f"seed {report['seed']}" + (f", {_fixed(report)}" if _fixed(report) else "")
                 + ")")
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


def _scaled(value: float | None, unit: int) -> float | None:
    """`value` in `unit`s; a count stays an int for its "{:,}" label (unit 1)."""
    return value if value is None or unit == 1 else value / unit


def _columns(report: dict) -> list[str]:
    """The table's headers: the run's name (a sweep: each grid key), then what was measured;
    trainable parameters only where the adapters differ, the validation rewards only for
    preference objectives."""
    lead = list(report["grid"]) if report["axis"] == "grid" else [report["axis"]]
    return [*lead, *(["trainable"] if _adapter_varies(report) else []),
            _memory_name(report), "tokens/s", "train loss", "val loss",
            *(["val reward acc", "val reward margin"] if _preference(report) else []),
            "train s", "total s", "status"]


def _cells(row: dict, report: dict) -> list[str]:
    def num(key: str, fmt: str) -> str:
        return "-" if row.get(key) is None else fmt.format(row[key])

    memory = row[_memory_key(report)]
    status = "ok" if row["status"] == "ok" else f"{row['status']}: {row['error'] or ''}".strip()
    rewards = [num("val_reward_accuracy", "{:.1%}"), num("val_reward_margin", "{:.3f}")]
    lead = list(row["grid"].values()) if report["axis"] == "grid" else [_label(row, report)]
    return [*lead, *([num("trainable_params", "{:,}")] if _adapter_varies(report) else []),
            "-" if memory is None else _bytes(memory), num("tokens_per_s", "{:,.0f}"),
            num("final_loss", "{:.4f}"), num("final_val_loss", "{:.4f}"),
            *(rewards if _preference(report) else []),
            _seconds(row["train_seconds"]), _seconds(row["wall_seconds"]), status]


def _notes(report: dict) -> list[str]:
    notes = []
    for row in report["rows"]:
        label = _label(row, report)
        first = report["rows"][0]
        if row["objective"] != "sft" and (report["axis"] == "objective" or row is first or (
                row["objective"], row["objective_keys"]) != (first["objective"],
                                                             first["objective_keys"])):
            keys = ", ".join(f"{k} {v}" for k, v in row["objective_keys"].items())
            shown = keys if report["axis"] == "objective" else f"objective {row['objective']}: {keys}"
            notes.append(f"{label}: {shown}")
        adapter = [key for key in row["dropped_keys"] if key.startswith("adapter.")]
        objective = [key for key in row["dropped_keys"] if key not in adapter]
        for keys, owner in ((adapter, row["method"]), (objective, row["objective"])):
            if keys:
                notes.append(f"{label}: dropped {', '.join(keys)} (not "
                             f"{'keys' if len(keys) > 1 else 'a key'} of {owner})")
        for key in row.get("defaulted_keys", []):
            name = key.rpartition(".")[2]
            notes.append(f"{label}: {name} is {row['objective']}'s default, not the recipe's "
                         f"(its scale differs by objective; --set {label}.{name}=... to choose)")
        if row["overrides"]:
            notes.append(f"{label}: --set {' '.join(row['overrides'])}")
    return notes


def _label(row: dict, report: dict) -> str:
    """A row's name, and its run's directory under the comparison's: its method or objective,
    or a sweep run's name (`lr=3e-4,r=16`)."""
    return row["name"] if report["axis"] == "grid" else row[report["axis"]]


def _verb(report: dict) -> str:
    return "sweep" if report["axis"] == "grid" else "compare"


def _grid(report: dict) -> str:
    """`train.lr 1e-4, 3e-4 x adapter.r 8, 16`."""
    return " x ".join(f"{key} {', '.join(values)}" for key, values in report["grid"].items())


def _left(index: int, columns: list[str], report: dict) -> bool:
    """The name columns (a sweep's grid values) and the status read left to right."""
    lead = len(report["grid"]) if report["axis"] == "grid" else 1
    return index < lead or index == len(columns) - 1


def _adapter_varies(report: dict) -> bool:
    """Whether the trainable parameters can differ: other methods, or a grid of adapter keys."""
    return report["axis"] == "method" or (
        report["axis"] == "grid" and any(key.startswith("adapter.") for key in report["grid"]))


def _ranked_by(report: dict) -> str:
    return {"final_val_loss": "validation loss",
            "final_loss": "train loss (no validation data)"}.get(report["ranked_by"], "-")


def _best(report: dict) -> str:
    """`best (lowest validation loss, 2.7312): lr=3e-4,r=16`, or why there is none."""
    best = report["best"]
    if best is None:
        return "best: none (no run finished with a loss)"
    value = best[report["ranked_by"]]
    return f"best (lowest {_ranked_by(report)}, {value:.4f}): {best['name']}; train it with"


def _fixed(report: dict) -> str:
    """The axis every run shares, where it is worth saying: `adapter method lora`,
    `objective dpo` (none for a comparison of methods on the default objective, sft)."""
    if report["axis"] == "objective":
        return f"adapter method {', '.join(report['methods'])}"
    if report["objectives"] != ["sft"]:
        return f"objective {', '.join(report['objectives'])}"
    return ""


def _preference(report: dict) -> bool:
    return any(row["objective"] != "sft" for row in report["rows"])


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
