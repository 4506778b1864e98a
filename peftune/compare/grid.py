"""What a sweep trains: every combination of `--grid KEY=V1,V2` values, one validated recipe each.

`peftune sweep RECIPE --grid train.lr=1e-4,3e-4 --grid adapter.r=8,16` trains the cartesian
product of the grids, in the order given (the first grid varies slowest): each run is exactly
`peftune train RECIPE [overrides] train.lr=... adapter.r=...` into a directory of its own, so
the best run's command line reproduces it. A run's name (and directory) is its values,
`lr=1e-4,r=8`: the last part of each key, or the whole key where two grids end alike
(`adapter.dropout`, `train.objective.beta`), and each value with every character other than
letters, digits and `._+-=` turned into `-` (a name that two runs would share gets `_N`,
its run's number; one over 120 characters is `run-NN`).

A grid may vary any recipe key but those a comparison holds fixed (plan.SHARED_KEYS: model,
data, output, steps, epochs, seed, batch, accumulation) and the axes of `peftune compare`
(`adapter.method`, `train.objective.name`): runs of different methods drop each other's
keys, and different objectives' losses are different quantities, so neither sorts by loss.

Every grid is checked before anything trains, and every problem is reported at once: the
syntax, the run count against `--max-runs`, each value alone (through the recipe loader, so
an unknown key gets its did-you-mean), then every combination.
"""

from __future__ import annotations

import itertools
import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peftune.compare.plan import (
    SHARED_KEYS,
    CompareRun,
    key_of,
    load_run_recipe,
    own_method_problems,
    recipe_choices,
)
from peftune.errors import InputError
from peftune.recipe.errors import Locations
from peftune.recipe.schema import Recipe

DEFAULT_MAX_RUNS = 16  # the CLI's --max-runs default too: a typo should not launch 400 runs
# Why a sweep keeps a shared key the same for every run (the first that a key overlaps).
FIXED_BECAUSE = {
    "model": "the base model is what the sweep tunes for",
    "data": "every run's loss must be measured on the same rows and tokens",
    "output": "each run writes into OUT/<run name>",
    "train.max_steps": "every run trains on as many tokens as the others",
    "train.epochs": "every run trains on as many tokens as the others",
    "train.batch_size": "every run trains on as many tokens as the others",
    "train.grad_accum": "every run trains on as many tokens as the others",
    "train.seed": "a difference between seeds is noise, not the effect of a setting",
}
# Largest directory name: longer ones (many keys, long values) become run-NN.
MAX_NAME = 120


@dataclass(frozen=True)
class Grid:
    """One `--grid KEY=V1,V2`: the recipe path and its values, as written."""

    key: str
    values: tuple[str, ...]
    given: str  # the option as written, to locate messages

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.key.split("."))

    @property
    def shown(self) -> str:
        return f"--grid {self.given!r}"


def load_sweep_runs(recipe_path: str | Path, *, grids: Sequence[str],
                    overrides: Sequence[str] = (), max_runs: int = DEFAULT_MAX_RUNS
                    ) -> tuple[list[Grid], list[CompareRun]]:
    """The grids and one validated run per combination, or one InputError with every problem:
    of the grids' syntax and keys, of each value alone, then of each combination."""
    parsed, problems = parse_grids(grids, overrides, max_runs=max_runs)
    try:  # the recipe's own method, as compare checks it (an unreadable file: one line)
        method, _, where = recipe_choices(recipe_path, overrides)
    except InputError as err:
        raise InputError(*problems, *err.lines) from None
    if own := own_method_problems(method, [], where):
        raise InputError(*problems, *own)
    usable = [grid for grid in parsed if not any(line.startswith(grid.shown) for line in problems)]
    for grid in usable:  # each value alone: its key and type, once per value
        recipes: dict[str, Recipe] = {}
        for value in grid.values:
            recipe, lines = _load(recipe_path, method, overrides, {grid: value}, where)
            problems += lines
            if recipe is not None:
                recipes[value] = recipe
        problems += _same_values(grid, recipes)
    if problems:
        raise InputError(*dict.fromkeys(problems))
    runs, failed = [], {}
    names = short_keys([grid.key for grid in parsed])  # the keys are unique by now
    short = {grid: names[grid.key] for grid in parsed}
    for number, values in enumerate(itertools.product(*(grid.values for grid in parsed)), 1):
        chosen = dict(zip(parsed, values, strict=True))
        recipe, lines = _load(recipe_path, method, overrides, chosen, where)
        if lines:
            failed[tuple(values)] = lines
        else:
            runs.append(CompareRun(_run_name(chosen, short, number), recipe, [],
                                   grid={grid.key: value for grid, value in chosen.items()}))
    if failed:
        raise InputError(*_combination_problems(failed, parsed, short, len(failed) + len(runs)))
    _unique_names(runs)
    return parsed, runs


def parse_grids(given: Sequence[str], overrides: Sequence[str], *, max_runs: int
                ) -> tuple[list[Grid], list[str]]:
    """The well-formed grids, and every problem: syntax, a key a sweep keeps fixed, a key
    given twice (or inside another grid's, or a plain override's), the run count."""
    if not given:
        return [], ["--grid: no grid given; name a recipe key and the values to try, such as "
                    "--grid train.lr=1e-4,3e-4"]
    grids, problems = [], []
    for text in given:
        key, sep, rest = text.partition("=")
        key = ".".join(part.strip() for part in key.split("."))
        if not sep or not all(key.split(".")):
            problems.append(f"--grid {text!r}: expected KEY=V1,V2,..., such as "
                            "train.lr=1e-4,3e-4")
            continue
        grid = Grid(key, tuple(split_values(rest)), text)
        grids.append(grid)
        problems += [f"{grid.shown}: {problem}" for problem in _grid_problems(grid, overrides)]
    for index, grid in enumerate(grids):
        for other in grids[:index]:
            if grid.key == other.key:
                problems.append(f"--grid {grid.key}: given twice ({other.given!r} and "
                                f"{grid.given!r}); list all its values in one --grid")
            elif _overlaps(grid.parts, other.parts):
                problems.append(f"--grid {other.key} and --grid {grid.key}: one is inside the "
                                "other; vary one of them")
    sizes = [len(grid.values) for grid in grids]
    if grids and math.prod(sizes) > max_runs:
        count = math.prod(sizes)
        product = f"{' x '.join(map(str, sizes))} = " if len(sizes) > 1 else ""
        problems.append(f"--grid: {product}{count} runs, more than "
                        f"--max-runs {max_runs}; list fewer values, or pass --max-runs {count} "
                        "to train them all")
    return grids, problems


def split_values(text: str) -> list[str]:
    """`1e-4, 3e-4` -> ['1e-4', '3e-4']; a comma inside [...], {...} or quotes is part of
    its value (`[q_proj,v_proj],all-linear` is two values)."""
    values, depth, quote, start = [], 0, None, 0
    for index, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            values.append(text[start:index].strip())
            start = index + 1
    return [*values, text[start:].strip()]


def rank_runs(report: dict) -> None:
    """Sort the rows by validation loss (train loss where no run has one), failed and
    unmeasured runs last, and name the best run with the `peftune train` command that
    reproduces it (report["ranked_by"], report["best"])."""
    rows = report["rows"]
    metric = ("final_val_loss" if any(row["final_val_loss"] is not None for row in rows)
              else "final_loss")
    rows.sort(key=lambda row: (row["status"] != "ok", row[metric] is None, row[metric] or 0.0))
    report["ranked_by"] = metric
    best = rows[0] if rows and rows[0]["status"] == "ok" and rows[0][metric] is not None \
        else None
    report["best"] = None if best is None else {
        "name": best["name"], "grid": best["grid"], metric: best[metric],
        "command": train_command(report["recipe"], report["overrides"], best["grid"])}


def train_command(recipe: str, overrides: Sequence[str], grid: dict[str, str]) -> str:
    """`peftune train RECIPE OVERRIDES KEY=VALUE...`, quoted for a POSIX shell."""
    return shlex.join(["peftune", "train", recipe, *overrides,
                       *(f"{key}={value}" for key, value in grid.items())])


def _grid_problems(grid: Grid, overrides: Sequence[str]) -> list[str]:
    problems = []
    if grid.values == ("",):
        problems.append(f"no values after '='; list them separated by commas, such as "
                        f"{grid.key}=V1,V2")
    elif "" in grid.values:
        problems.append(f"an empty value in {grid.given.partition('=')[2]!r}; separate the "
                        "values with single commas")
    for value in dict.fromkeys(grid.values):
        if value and grid.values.count(value) > 1:
            problems.append(f"{value} is listed {grid.values.count(value)} times; list each "
                            "value once")
    fixed = next((key for key in SHARED_KEYS if _overlaps(grid.parts, tuple(key.split(".")))),
                 None)
    names = ",".join(grid.values)
    if fixed == "output":
        problems.append(f"{grid.key}: {FIXED_BECAUSE[fixed]}; --out DIR names the sweep's "
                        "directory")
    elif fixed is not None:
        owner = "" if fixed == grid.key else f"{fixed}: "
        problems.append(f"{grid.key}: the same for every run of a sweep ({owner}"
                        f"{FIXED_BECAUSE[fixed]}); to change it for all runs, pass it as an "
                        f"override, {grid.key}={grid.values[0]}")
    elif _overlaps(grid.parts, ("adapter", "method")):
        problems.append(f"{grid.key}: a sweep tunes one method's settings (methods drop each "
                        "other's keys); compare methods with peftune compare RECIPE --methods "
                        f"{names if grid.key == 'adapter.method' else 'lora,dora'}")
    elif _overlaps(grid.parts, ("train", "objective", "name")):
        problems.append(f"{grid.key}: a sweep keeps the recipe's objective (each objective's "
                        "loss is its own quantity, so the runs would not sort by it); compare "
                        "objectives with peftune compare RECIPE --objectives "
                        f"{names if grid.key == 'train.objective.name' else 'dpo,simpo'}")
    for override in overrides:
        if _overlaps(grid.parts, key_of(override)):
            problems.append(f"{grid.key}: also set by the override {override!r}; keep the "
                            "grid or the override")
    return problems


def _overlaps(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """One key path is the other or inside it (`train` and `train.seed`)."""
    size = min(len(a), len(b))
    return a[:size] == b[:size]


def _load(recipe_path: str | Path, method: str, overrides: Sequence[str],
          chosen: dict[Grid, str], where: Locations) -> tuple[Recipe | None, list[str]]:
    """The recipe with `chosen` grid values (each located as its --grid), or its problems."""
    labelled = [(grid.shown, f"{grid.key}={value}") for grid, value in chosen.items()]
    recipe, _, problems = load_run_recipe(recipe_path, method, overrides, labelled,
                                          own_method_at=where)
    return recipe, problems


def _same_values(grid: Grid, recipes: dict[str, Recipe]) -> list[str]:
    """`3e-4` and `0.0003` are two spellings of one run: each value must change the recipe."""
    seen: dict[str, str] = {}
    problems = []
    for value, recipe in recipes.items():
        dumped = recipe.model_dump_json()
        if dumped in seen:
            problems.append(f"{grid.shown}: {seen[dumped]} and {value} give the same recipe; "
                            "list each value once")
        else:
            seen[dumped] = value
    return problems


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """The last part of each key (`train.lr`: `lr`), or the whole key where two end alike:
    how run names and the terminal table name a grid's keys."""
    last = [key.rpartition(".")[2] for key in keys]
    return {key: end if last.count(end) == 1 else key for key, end in zip(keys, last, strict=True)}


def _run_name(chosen: dict[Grid, str], short: dict[Grid, str], number: int) -> str:
    """`lr=3e-4,r=16`: readable, and one directory name on any filesystem."""
    name = ",".join(f"{short[grid]}={_safe(value)}" for grid, value in chosen.items())
    return name if len(name) <= MAX_NAME else f"run-{number:02d}"


def _safe(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", value).strip("-") or "-"


def _unique_names(runs: list[CompareRun]) -> None:
    """Two values that differ only in characters `_safe` replaces: number the later runs."""
    seen: set[str] = set()
    for number, run in enumerate(runs, 1):
        if run.name in seen:
            run.name = f"{run.name}_{number}"
        seen.add(run.name)


def _combination_problems(failed: dict[tuple[str, ...], list[str]], grids: list[Grid],
                          short: dict[Grid, str], total: int) -> list[str]:
    """Each problem once: as it is when every combination has it, else prefixed with the
    values all that have it share (`r=16: ...`), or with their names where they share none."""
    combos: dict[str, list[tuple[str, ...]]] = {}
    for values, lines in failed.items():
        for line in lines:
            combos.setdefault(line, []).append(values)
    out = []
    for line, having in combos.items():
        common = [f"{short[grid]}={having[0][i]}" for i, grid in enumerate(grids)
                  if len({values[i] for values in having}) == 1]
        names = [",".join(f"{short[g]}={v}" for g, v in zip(grids, values, strict=True))
                 for values in having]
        where = (",".join(common) if common else "; ".join(names[:3])
                 + (f" and {len(names) - 3} more runs" if len(names) > 3 else ""))
        out.append(line if len(having) == total else f"{where}: {line}")
    return out
