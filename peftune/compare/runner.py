"""`run_compare`: validate one recipe for every method, then train them one after another.

Every method's recipe is validated (and the output directory and data paths checked) before
anything trains, so bad input exits 2 with nothing written. Each method then trains with
`run_train` into `OUT/<method>/`, in a process of its own: `peak_rss_bytes` (ru_maxrss) and
CUDA's max allocated only ever grow within a process, so in a shared one every method after
the first would report the largest peak so far. A method that fails is recorded with its
error and the others still train. The figures in the table are read from each run's
summary.json; `compare.json` is rewritten after every method, so a stopped comparison keeps
what it measured (and marks the directory as a comparison that `--overwrite` may replace).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftune.errors import InputError, TrainingError
from peftune.recipe.errors import did_you_mean
from peftune.recipe.schema import Recipe

MARKER = "compare.json"
# What makes the runs comparable: the same model, data, steps, batch and seed for every method.
SHARED_KEYS = ("model", "data", "output", "train.max_steps", "train.epochs", "train.seed",
               "train.batch_size", "train.grad_accum")
# The numbers a row copies from the run's summary.json, unchanged.
SUMMARY_KEYS = ("trainable_params", "total_params", "peak_rss_bytes", "peak_cuda_allocated_bytes",
                "tokens_per_s", "final_loss", "final_val_loss", "train_seconds",
                "setup_seconds", "steps", "tokens")


@dataclass
class MethodRun:
    """One method of the comparison: its validated recipe and how it differs from the file."""

    method: str
    recipe: Recipe
    dropped: list[str]  # adapter keys of the recipe this method does not take
    overrides: list[str] = field(default_factory=list)  # its --set values, as written


def run_compare(*, recipe_path: str | Path, methods: str | Sequence[str],
                overrides: Sequence[str] = (), method_overrides: Sequence[str] = (),
                out: str | Path | None = None, overwrite: bool = False,
                quiet: bool = False) -> dict:
    """Train each of `methods` on the recipe's data, steps and seed and write compare.json,
    compare.md and compare.png into `out` (default: the recipe's output.dir + "-compare").

    `overrides` (`KEY.PATH=VALUE`) apply to every method; `method_overrides`
    (`METHOD.KEY=VALUE`) to one: an adapter key (`lora.r=16`) or a recipe path
    (`full.train.lr=1e-5`). Returns the report written to compare.json; a failed method is a
    row with `status: failed` (see `exit_code`).
    """
    from peftune.compare.report import (
        print_failed,
        print_plan,
        print_running,
        print_table,
        write_report,
    )

    runs = load_runs(recipe_path, methods, overrides, method_overrides)
    shared = runs[0].recipe
    key = "--out" if out is not None else "--out (default: output.dir + -compare)"
    out = Path(out) if out is not None else Path(os.path.normpath(shared.output.dir) + "-compare")
    check_compare_dir(out, overwrite=overwrite, key=key)
    from peftune.train.checkpoint import probe_output_location
    from peftune.train.output import check_data_paths

    for run in runs:  # each method's own paths too (adapter.calibration.data)
        check_data_paths(run.recipe)
    probe_output_location(out, key=key)  # read-only or full: fail now, not after a method

    make_compare_dir(out, key=key)
    report = {"recipe": str(recipe_path), "methods": [r.method for r in runs],
              "overrides": list(overrides), "out": str(out),
              "steps": shared.train.max_steps, "epochs": shared.train.epochs,
              "seed": shared.train.seed, "data": {"train": shared.data.train,
                                                   "val": shared.data.val},
              "model": shared.model.path, "rows": [_row(run, out) for run in runs]}
    _write_json(out / MARKER, report)
    if not quiet:
        print_plan(report)
    for index, run in enumerate(runs):
        if not quiet:
            print_running(report, index)
        started = time.perf_counter()
        into = run.recipe.output.model_copy(update={"dir": str(out / run.method)})
        kind, error = _train_in_own_process(run.recipe.model_copy(update={"output": into}),
                                            quiet=quiet)
        row = report["rows"][index]
        row["wall_seconds"] = round(time.perf_counter() - started, 3)
        summary_path = out / run.method / "summary.json"
        if kind == "ok" and not summary_path.is_file():
            kind, error = "crash", f"the run wrote no {summary_path}"
        if kind == "ok":
            summary = json.loads(summary_path.read_text())
            row.update({key: summary.get(key) for key in SUMMARY_KEYS}, status="ok")
        else:
            row.update(status="failed", error=error, error_kind=kind)
            if not quiet:
                print_failed(row)
        _write_json(out / MARKER, report)
    write_report(report, out)
    if not quiet:
        print_table(report)
    return report


def exit_code(report: dict) -> int:
    """0 when every method trained; 2 when the only failures were bad input found late (a
    model path, a data row, a target module), 1 otherwise."""
    failed = [row for row in report["rows"] if row["status"] != "ok"]
    if not failed:
        return 0
    return 2 if all(row.get("error_kind") == "input" for row in failed) else 1


def load_runs(recipe_path: str | Path, methods: str | Sequence[str], overrides: Sequence[str],
              method_overrides: Sequence[str]) -> list[MethodRun]:
    """Every method's validated recipe, or one InputError with every problem of all of them."""
    from peftune.models.facts import inspect_model
    from peftune.recipe.loader import load_method_recipe

    names = parse_methods(methods)
    per_method, problems = _split_method_overrides(method_overrides, names)
    for override in overrides:
        if _key_of(override) == ("adapter", "method"):
            problems.append(f"override {override!r}: adapter.method: set by --methods in a "
                            "comparison; remove this override")
    if problems:
        raise InputError(*problems)
    runs, lines = [], []
    for name in names:
        mine = per_method.get(name, [])
        try:
            recipe, dropped = load_method_recipe(recipe_path, name, overrides,
                                                 [(f"--set {o!r}", t) for o, t in mine],
                                                 inspect_model=inspect_model)
        except InputError as err:
            lines += err.lines
            continue
        runs.append(MethodRun(name, recipe, dropped, [o for o, _ in mine]))
    if lines:
        raise InputError(*dict.fromkeys(lines))  # a problem of the shared recipe, once
    return runs


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """`lora,full` (or a list of names, each possibly comma-separated) as checked names."""
    from peftune.adapters.registry import method_names

    given = [methods] if isinstance(methods, str) else list(methods)
    names = [name.strip() for item in given for name in item.split(",")]
    choices = method_names()
    if not any(names):
        raise InputError("--methods: no method given; name the methods to train, separated "
                         f"by commas (choose from: {', '.join(choices)})")
    if "" in names:
        raise InputError(f"--methods: an empty name in {','.join(names)!r}; separate the "
                         "names with single commas")
    problems = []
    for name in dict.fromkeys(names):
        if name not in choices:
            problems.append(f"--methods: unknown method {name!r}; choose from: "
                            f"{', '.join(choices)}{did_you_mean(name, choices)}")
        elif names.count(name) > 1:
            problems.append(f"--methods: {name} is named {names.count(name)} times; name each "
                            "method once (vary one method's keys with a separate comparison)")
    if problems:
        raise InputError(*problems)
    return names


def _split_method_overrides(method_overrides: Sequence[str], names: list[str]
                            ) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """`METHOD.KEY=VALUE` -> {method: [(as written, recipe override)]}, and the problems.
    KEY is a dotted recipe path when it starts with a section (`full.train.lr=1e-5`), else an
    adapter key (`lora.r=16` means `adapter.r=16`)."""
    sections = tuple(Recipe.model_fields)
    grouped: dict[str, list[tuple[str, str]]] = {}
    problems = []
    for override in method_overrides:
        key, sep, value = override.partition("=")
        method, dot, rest = key.strip().partition(".")
        if not sep or not dot or not method or not rest.strip():
            problems.append(f"--set {override!r}: expected METHOD.KEY=VALUE, such as "
                            f"{names[0]}.train.lr=1e-4")
            continue
        if method not in names:
            problems.append(f"--set {override!r}: {method} is not one of --methods "
                            f"({', '.join(names)}){did_you_mean(method, names)}")
            continue
        path = rest.strip() if rest.strip().split(".")[0] in sections else f"adapter.{rest.strip()}"
        parts = tuple(part.strip() for part in path.split("."))
        shared = next((k for k in SHARED_KEYS if parts[: len(k.split("."))] == tuple(k.split("."))),
                      None)
        if parts == ("adapter", "method"):
            problems.append(f"--set {override!r}: adapter.method: each method is set by "
                            "--methods; remove this override")
        elif shared is not None:
            problems.append(f"--set {override!r}: {'.'.join(parts)}: the same for every "
                            f"method in a comparison ({shared}); set it for all as "
                            f"{'.'.join(parts)}={value}")
        else:
            grouped.setdefault(method, []).append((override, f"{path}={value}"))
    return grouped, problems


def _key_of(override: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in override.partition("=")[0].split("."))


def check_compare_dir(out: Path, *, overwrite: bool, key: str = "--out") -> None:
    """train's output-directory policy for the comparison directory, with compare.json where
    a run has recipe.yaml. A new or empty directory gets `output_dir_problem` whole (never
    the filesystem root, the home or current directory or one above it, a git repository's
    root, a file, a broken link or a symlink loop; `..` and links count where they resolve).
    A non-empty one needs --overwrite and must be an earlier comparison (it holds
    compare.json), and is never the current directory or one above it."""
    from peftune.recipe.guards import output_dir_problem

    try:
        non_empty = out.is_dir() and any(out.iterdir())
    except OSError as err:  # a directory it may not list
        raise InputError(f"{key}: {out}: cannot inspect it ({err.strerror or err}); choose "
                         "another --out") from None
    if not non_empty:
        problem = output_dir_problem(str(out))
        if problem is not None:
            raise InputError(f"{key}: {problem}")
        return
    if not overwrite:
        raise InputError(f"{key}: {out} is not empty; pass --overwrite to replace an earlier "
                         "comparison, or choose another --out")
    if not (out / MARKER).is_file():
        raise InputError(f"--overwrite: {out} is not a peftune compare directory (no "
                         f"{MARKER}); refusing to delete it. Choose another --out")
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise InputError(f"{key}: {out} is the current directory or contains it; choose a new "
                         "directory for the comparison")


def make_compare_dir(out: Path, *, key: str = "--out") -> None:
    """An empty `out`, once check_compare_dir has passed it: an earlier comparison there is
    deleted (through a link, the directory the link points to, so the link stays)."""
    target = out.resolve()
    try:
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
    except OSError as err:  # a file where a parent directory should be
        raise InputError(f"{key}: cannot create {out} ({err.strerror or err}); choose another "
                         "--out") from None


def _row(run: MethodRun, out: Path) -> dict[str, Any]:
    return {"method": run.method, "status": "pending", "error": None, "error_kind": None,
            "run_dir": str(out / run.method), "dropped_keys": run.dropped,
            "overrides": run.overrides, **dict.fromkeys(SUMMARY_KEYS), "wall_seconds": None}


def _write_json(path: Path, report: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def _train_in_own_process(recipe: Recipe, *, quiet: bool) -> tuple[str, str | None]:
    """("ok", None) or (kind, one-line error): kind is input, training or crash."""
    context = multiprocessing.get_context("spawn")  # a fresh process: its own peak memory
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_train_child, args=(recipe, quiet, send),
                              name=f"peftune-compare-{recipe.adapter.method}")
    process.start()
    send.close()
    try:
        try:
            outcome = receive.recv()
        except EOFError:  # died without a word: killed, out of memory, a crash in C code
            outcome = None
        process.join()
    finally:
        if process.is_alive():  # interrupted: stop the child too
            process.terminate()
            process.join()
    if outcome is None:
        return "crash", f"the training process exited with code {process.exitcode} and no result"
    return outcome


def _train_child(recipe: Recipe, quiet: bool, send: Any) -> None:
    from peftune.train.run import run_train

    try:
        run_train(recipe, quiet=quiet)
        outcome: tuple[str, str | None] = ("ok", None)
    except InputError as err:
        outcome = ("input", "; ".join(err.lines))
    except TrainingError as err:
        outcome = ("training", str(err))
    except Exception as err:  # noqa: BLE001 - any failure is this method's row, not the end
        outcome = ("crash", f"{type(err).__name__}: {err}".splitlines()[0])
        if os.environ.get("PEFTUNE_DEBUG") == "1":
            traceback.print_exc()
    send.send(outcome)
    send.close()
