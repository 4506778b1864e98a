"""`run_compare` and `run_sweep`: validate one recipe for every run, then train them one
after another (`train_runs`).

A comparison's runs differ in one axis, the adapter method or the training objective
(`peftune.compare.plan`); a sweep's in the values of its grid (`peftune.compare.grid`), and
its rows end sorted by validation loss. Every run's recipe is validated (and the output
directory and data paths checked) before anything trains, so bad input exits 2 with nothing
written. Each run then trains with `run_train` into `OUT/<run name>/` (its method, objective
or grid values), in a process of its own: `peak_rss_bytes` (ru_maxrss) and CUDA's max
allocated only ever grow within a process, so in a shared one every run after the first
would report the largest peak so far. A run that fails is recorded with its error and the
others still train. The figures in the table are read from each run's summary.json;
`compare.json` is rewritten after every run, so a stopped comparison keeps what it measured
(and marks the directory as a comparison that `--overwrite` may replace).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from peftune.compare.grid import DEFAULT_MAX_RUNS, load_sweep_runs, rank_runs
from peftune.compare.plan import CompareRun, load_runs
from peftune.errors import InputError, TrainingError
from peftune.recipe.schema import Recipe

MARKER = "compare.json"
# The numbers a row copies from the run's summary.json, unchanged.
SUMMARY_KEYS = ("trainable_params", "total_params", "peak_rss_bytes", "peak_cuda_allocated_bytes",
                "tokens_per_s", "final_loss", "final_val_loss", "train_seconds",
                "setup_seconds", "steps", "tokens")
# ... and from its `objective` block: the reference used and the last validation's rewards.
OBJECTIVE_SUMMARY_KEYS = ("reference", "val_reward_accuracy", "val_reward_margin")


def run_compare(*, recipe_path: str | Path, methods: str | Sequence[str] | None = None,
                objectives: str | Sequence[str] | None = None, overrides: Sequence[str] = (),
                run_overrides: Sequence[str] = (), out: str | Path | None = None,
                overwrite: bool = False, quiet: bool = False) -> dict:
    """Train each of `methods`, or each of `objectives`, on the recipe's data, steps and seed
    and write compare.json, compare.md and compare.png into `out` (default: the recipe's
    output.dir + "-compare"). One of the two may list several names; the other, if given,
    one name for every run (else the recipe's own method or objective).

    `overrides` (`KEY.PATH=VALUE`) apply to every run; `run_overrides` (`NAME.KEY=VALUE`)
    to the runs of one method or objective: an adapter key (`lora.r=16`), an objective key
    (`dpo.beta=0.2`) or a recipe path (`full.train.lr=1e-5`). Returns the report written to
    compare.json; a failed run is a row with `status: failed` (see `exit_code`).
    """
    axis, runs = load_runs(recipe_path, methods=methods, objectives=objectives,
                           overrides=overrides, run_overrides=run_overrides)
    out, key = check_out(runs, out, overwrite=overwrite, suffix="-compare")
    report = new_report(recipe_path, axis, runs, overrides, out)
    return train_runs(runs, report, out, out_key=key, quiet=quiet)


def run_sweep(*, recipe_path: str | Path, grids: Sequence[str], overrides: Sequence[str] = (),
              max_runs: int = DEFAULT_MAX_RUNS, out: str | Path | None = None,
              overwrite: bool = False, quiet: bool = False) -> dict:
    """Train every combination of `grids` (`KEY=V1,V2`, `peftune.compare.grid`) on the
    recipe's data, steps and seed, each run `RECIPE overrides KEY=VALUE...` into
    `out/<run name>` (default out: the recipe's output.dir + "-sweep"), and write
    compare.json, compare.md and compare.png with a column per grid key and the rows sorted
    by validation loss, failed runs last. A grid of more than `max_runs` runs is refused.
    Returns the report, whose `best` names the best run and its `peftune train` command."""
    grid, runs = load_sweep_runs(recipe_path, grids=grids, overrides=overrides,
                                 max_runs=max_runs)
    out, key = check_out(runs, out, overwrite=overwrite, suffix="-sweep")
    report = new_report(recipe_path, "grid", runs, overrides, out,
                        grid={g.key: list(g.values) for g in grid}, ranked_by=None, best=None)
    return train_runs(runs, report, out, out_key=key, quiet=quiet, finish=rank_runs)


def check_out(runs: list[CompareRun], out: str | Path | None, *, overwrite: bool,
              suffix: str) -> tuple[Path, str]:
    """The directory of a comparison (default: the recipe's output.dir + `suffix`) and how
    messages name it, once it and every run's data paths pass; nothing is written."""
    from peftune.train.checkpoint import probe_output_location
    from peftune.train.output import check_data_paths

    key = "--out" if out is not None else f"--out (default: output.dir + {suffix})"
    out = (Path(out) if out is not None
           else Path(os.path.normpath(runs[0].recipe.output.dir) + suffix))
    check_compare_dir(out, overwrite=overwrite, key=key)
    for run in runs:  # each run's own paths too (adapter.calibration.data)
        check_data_paths(run.recipe)
    probe_output_location(out, key=key)  # read-only or full: fail now, not after a run
    return out, key


def new_report(recipe_path: str | Path, axis: str, runs: list[CompareRun],
               overrides: Sequence[str], out: Path, **extra: Any) -> dict:
    """What compare.json says before any run trains: what is shared, and a pending row per
    run; `extra` (a sweep's grid) goes before the rows."""
    shared = runs[0].recipe
    return {"recipe": str(recipe_path), "axis": axis,
            "methods": list(dict.fromkeys(r.recipe.adapter.method for r in runs)),
            "objectives": list(dict.fromkeys(r.recipe.train.objective.name for r in runs)),
            "overrides": list(overrides), "out": str(out),
            "steps": shared.train.max_steps, "epochs": shared.train.epochs,
            "seed": shared.train.seed,  # a data mix's sources as the recipe writes them
            "data": shared.data.model_dump(mode="json", include={"train", "val"}),
            "model": shared.model.path, **extra, "rows": [_row(run, out) for run in runs]}


def train_runs(runs: list[CompareRun], report: dict, out: Path, *, out_key: str, quiet: bool,
               finish: Callable[[dict], None] | None = None) -> dict:
    """Train each run in a process of its own into `out/<run name>`, its row updated from
    its summary.json (or its error) and compare.json rewritten after each; then `finish`
    (a sweep ranks its rows), compare.md, compare.png and the table."""
    from peftune.compare.report import (
        print_failed,
        print_plan,
        print_running,
        print_table,
        write_report,
    )

    make_compare_dir(out, key=out_key)
    _write_json(out / MARKER, report)
    if not quiet:
        print_plan(report)
    for index, run in enumerate(runs):
        if not quiet:
            print_running(report, index)
        started = time.perf_counter()
        into = run.recipe.output.model_copy(update={"dir": str(out / run.name)})
        kind, error = _train_in_own_process(run.recipe.model_copy(update={"output": into}),
                                            name=run.name, quiet=quiet)
        row = report["rows"][index]
        row["wall_seconds"] = round(time.perf_counter() - started, 3)
        summary_path = out / run.name / "summary.json"
        if kind == "ok" and not summary_path.is_file():
            kind, error = "crash", f"the run wrote no {summary_path}"
        if kind == "ok":
            summary = json.loads(summary_path.read_text())
            row.update({key: summary.get(key) for key in SUMMARY_KEYS}, status="ok")
            block = summary.get("objective") or {}
            row.update({key: block.get(key) for key in OBJECTIVE_SUMMARY_KEYS})
        else:
            row.update(status="failed", error=error, error_kind=kind)
            if not quiet:
                print_failed(row, report)
        _write_json(out / MARKER, report)
    if finish is not None:
        finish(report)
        _write_json(out / MARKER, report)
    write_report(report, out)
    if not quiet:
        print_table(report)
    return report


def exit_code(report: dict) -> int:
    """0 when every run trained; 2 when the only failures were bad input found late (a
    model path, a data row, a target module), 1 otherwise."""
    failed = [row for row in report["rows"] if row["status"] != "ok"]
    if not failed:
        return 0
    return 2 if all(row.get("error_kind") == "input" for row in failed) else 1


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


def _row(run: CompareRun, out: Path) -> dict[str, Any]:
    objective = run.recipe.train.objective
    sweep = {"name": run.name, "grid": run.grid} if run.grid else {}
    return {**sweep, "method": run.recipe.adapter.method, "objective": objective.name,
            "objective_keys": {k: v for k, v in objective.model_dump(mode="json").items()
                               if k != "name"},
            "status": "pending", "error": None, "error_kind": None,
            "run_dir": str(out / run.name), "dropped_keys": run.dropped,
            "defaulted_keys": run.defaulted, "overrides": run.overrides,
            **dict.fromkeys(SUMMARY_KEYS), **dict.fromkeys(OBJECTIVE_SUMMARY_KEYS),
            "wall_seconds": None}


def _write_json(path: Path, report: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def _train_in_own_process(recipe: Recipe, *, name: str, quiet: bool) -> tuple[str, str | None]:
    """("ok", None) or (kind, one-line error): kind is input, training or crash."""
    context = multiprocessing.get_context("spawn")  # a fresh process: its own peak memory
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_train_child, args=(recipe, quiet, send),
                              name=f"peftune-compare-{name}")
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
    except Exception as err:  # noqa: BLE001 - any failure is this run's row, not the end
        outcome = ("crash", f"{type(err).__name__}: {err}".splitlines()[0])
        if os.environ.get("PEFTUNE_DEBUG") == "1":
            traceback.print_exc()
    send.send(outcome)
    send.close()
