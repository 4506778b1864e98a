"""What a comparison trains: one validated recipe per run, and how each differs from the file.

A comparison varies one axis: adapter methods (`--methods lora,dora`) or training objectives
(`--objectives dpo,ln-dpo,simpo`). The other axis keeps the recipe's value, or takes the one
name given for it (`--methods dora --objectives dpo,simpo`: dora in every run). Both listing
several names would be a grid in one table, and is refused. (`peftune sweep` trains a grid of
recipe values with one method and objective: `peftune.compare.grid`.)

`--set NAME.KEY=VALUE` addresses the runs of NAME, a method or an objective of the comparison
(the two sets of names do not overlap; a test keeps it so): KEY is an adapter key for a method
(`lora.r=16`), an objective key for an objective (`dpo.beta=0.2`), or a recipe path for either
(`ln-dpo.train.lr=1e-5`). The fixed axis's name addresses every run.

An objective run keeps the recipe's objective keys that it reads, except `beta`, whose scale
is each objective's own (DPO's 0.1 multiplies summed log-probs, SimPO's 2.0 averaged ones): it
stays with the objective the recipe names, and the others take their paper's default. The
keys left out are reported, as a method's dropped adapter keys are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftune.errors import InputError
from peftune.recipe.errors import Locations, Problem, did_you_mean, locate
from peftune.recipe.schema import OBJECTIVE_KEYS, Recipe

# What makes the runs comparable: the same model, data, steps, batch and seed for every run.
SHARED_KEYS = ("model", "data", "output", "train.max_steps", "train.epochs", "train.seed",
               "train.batch_size", "train.grad_accum")
AXES = ("method", "objective")


@dataclass
class CompareRun:
    """One run of the comparison: its name (the method or objective it stands for), its
    validated recipe and how that differs from the file."""

    name: str
    recipe: Recipe
    dropped: list[str]  # recipe keys this run does not take (adapter.r for full, ...)
    overrides: list[str] = field(default_factory=list)  # its --set values, as written
    defaulted: list[str] = field(default_factory=list)  # keys it has, at its own default
    grid: dict[str, str] = field(default_factory=dict)  # a sweep's values: {key: as written}


def load_runs(recipe_path: str | Path, *, methods: str | Sequence[str] | None = None,
              objectives: str | Sequence[str] | None = None, overrides: Sequence[str] = (),
              run_overrides: Sequence[str] = ()) -> tuple[str, list[CompareRun]]:
    """The axis ("method" or "objective") and every run's validated recipe, or one
    InputError with every problem of all of them (a problem of the shared recipe once)."""
    given = {"method": None if methods is None else parse_names(methods, "method"),
             "objective": None if objectives is None else parse_names(objectives, "objective")}
    axis = _axis(given)
    names = given[axis]
    fixed = given[_other(axis)] or []  # the other axis: one name, or the recipe's own
    per_run, problems = split_run_overrides(run_overrides, axis, names, fixed)
    for override in overrides:
        key = key_of(override)
        if key == ("adapter", "method") and given["method"] is not None:
            problems.append(f"override {override!r}: adapter.method: set by --methods in a "
                            "comparison; remove this override")
        elif key[:2] == ("train", "objective") and given["objective"] is not None:
            problems.append(f"override {override!r}: train.objective: set by --objectives in "
                            "a comparison; set an objective's key as --set OBJECTIVE.KEY=VALUE "
                            "(dpo.beta=0.2)")
    if problems:
        raise InputError(*problems)
    file_method, file_objective, where = recipe_choices(recipe_path, overrides)
    if given["method"] is None and (problems := own_method_problems(file_method, [], where)):
        raise InputError(*problems)
    runs, lines = [], {}
    for name in names:
        method = name if axis == "method" else (fixed[0] if fixed else file_method)
        objective = name if axis == "objective" else (fixed[0] if fixed else None)
        mine = (per_run.get(fixed[0], []) if fixed else []) + per_run.get(name, [])
        labelled = [(f"--set {shown!r}", target) for shown, target in mine]
        objective_dropped, defaulted = [], []
        if objective is not None:
            switch, objective_dropped, defaulted = objective_override(file_objective, objective)
            labelled[:0] = [(f"--objectives {objective}", switch)] if switch else []
            defaulted = [k for k in defaulted if not any(key_of(t) == tuple(k.split("."))
                                                         for _, t in mine)]
        recipe, dropped, found = load_run_recipe(
            recipe_path, method, overrides, labelled,
            own_method_at=where if given["method"] is None else None)
        if recipe is None:
            lines[name] = found
            continue
        runs.append(CompareRun(name, recipe, dropped + objective_dropped,
                               [shown for shown, _ in mine], defaulted))
    if lines:
        raise InputError(*_one_list(lines, len(names)))
    return axis, runs


def load_run_recipe(recipe_path: str | Path, method: str, overrides: Sequence[str],
                    labelled: Sequence[tuple[str, str]], *, own_method_at: Locations | None
                    ) -> tuple[Recipe | None, list[str], list[str]]:
    """One run's recipe: `overrides`, then `labelled` (`(shown, KEY=VALUE)` pairs, located as
    `shown`), with adapter method `method`. (recipe, the adapter keys it dropped, []) or
    (None, [], its problems). With `own_method_at` (where the recipe's keys were written)
    `method` is the recipe's own, and a key it does not take is a typo, not a key to drop."""
    from peftune.models.facts import inspect_model
    from peftune.recipe.loader import load_method_recipe

    try:
        recipe, dropped = load_method_recipe(recipe_path, method, overrides, labelled,
                                             inspect_model=inspect_model)
    except InputError as err:
        return None, [], err.lines
    if own_method_at is not None and dropped:
        return None, [], own_method_problems(method, dropped, own_method_at)
    return recipe, dropped, []


def parse_names(given: str | Sequence[str], kind: str) -> list[str]:
    """`lora,full` (or a list of names, each possibly comma-separated) as checked names of
    methods (`kind` "method") or objectives ("objective")."""
    from peftune.adapters.registry import method_names

    items = [given] if isinstance(given, str) else list(given)
    names = [name.strip() for item in items for name in item.split(",")]
    choices = method_names() if kind == "method" else list(OBJECTIVE_KEYS)
    option = f"--{kind}s"
    if not any(names):
        raise InputError(f"{option}: no {kind} given; name the {kind}s to train, separated by "
                         f"commas (choose from: {', '.join(choices)})")
    if "" in names:
        raise InputError(f"{option}: an empty name in {','.join(names)!r}; separate the "
                         "names with single commas")
    problems = []
    for name in dict.fromkeys(names):
        if name not in choices:
            problems.append(f"{option}: unknown {kind} {name!r}; choose from: "
                            f"{', '.join(choices)}{did_you_mean(name, choices)}")
        elif names.count(name) > 1:
            problems.append(f"{option}: {name} is named {names.count(name)} times; name each "
                            f"{kind} once (vary one {kind}'s keys with a separate comparison)")
    if problems:
        raise InputError(*problems)
    return names


def split_run_overrides(run_overrides: Sequence[str], axis: str, names: list[str],
                        fixed: list[str]) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """`NAME.KEY=VALUE` -> {name: [(as written, recipe override)]}, and the problems. KEY is a
    recipe path when it starts with a section (`full.train.lr=1e-5`), else an adapter key of
    a method (`lora.r=16`: `adapter.r=16`) or an objective key of an objective (`dpo.beta=0.2`:
    `train.objective.beta=0.2`)."""
    sections = tuple(Recipe.model_fields)
    objectives_given = axis == "objective" or bool(fixed)
    grouped: dict[str, list[tuple[str, str]]] = {}
    problems = []
    for override in run_overrides:
        key, sep, value = override.partition("=")
        name, dot, rest = key.strip().partition(".")
        rest = rest.strip()
        if not sep or not dot or not name or not rest:
            problems.append(f"--set {override!r}: expected NAME.KEY=VALUE, such as "
                            f"{names[0]}.train.lr=1e-4")
            continue
        if name not in names and name not in fixed:
            problems.append(f"--set {override!r}: {_not_compared(name, axis, names, fixed)}")
            continue
        kind = axis if name in names else _other(axis)
        short = rest.split(".")[0].strip() not in sections
        if short and kind == "objective":
            problem = _objective_key_problem(name, rest)
            if problem:
                problems.append(f"--set {override!r}: {problem}")
                continue
        home = "adapter" if kind == "method" else "train.objective"  # of a KEY alone
        path = f"{home}.{rest}" if short else rest
        parts = tuple(part.strip() for part in path.split("."))
        shared = next((k for k in SHARED_KEYS if parts[: len(k.split("."))] == tuple(k.split("."))),
                      None)
        if parts == ("adapter", "method"):
            problems.append(f"--set {override!r}: adapter.method: a comparison sets it for every "
                            "run (--methods); remove this override")
        elif parts[:2] == ("train", "objective") and not short and objectives_given:
            problems.append(f"--set {override!r}: train.objective: set by --objectives in a "
                            "comparison; set an objective's key as OBJECTIVE.KEY=VALUE "
                            "(dpo.beta=0.2)")
        elif shared is not None:
            problems.append(f"--set {override!r}: {'.'.join(parts)}: the same for every "
                            f"{axis} in a comparison ({shared}); set it for all as "
                            f"{'.'.join(parts)}={value}")
        else:
            grouped.setdefault(name, []).append((override, f"{path}={value}"))
    return grouped, problems


def objective_override(file_objective: Any, name: str) -> tuple[str | None, list[str], list[str]]:
    """The override that makes a recipe whose `train.objective` is `file_objective` train
    `name` (None: it already does), the recipe's objective keys it leaves out (not keys of
    `name`), and those `name` has but takes at its own default (`beta` of another objective)."""
    keys = file_objective if isinstance(file_objective, dict) else {}
    own = file_objective if isinstance(file_objective, str) else keys.get("name", "sft")
    if own == name:
        return None, [], []
    carried = {"name": name}
    dropped, defaulted = [], []
    for key, value in keys.items():
        if key == "name":
            continue
        if key not in OBJECTIVE_KEYS[name]:
            dropped.append(f"train.objective.{key}")
        elif key == "beta":
            defaulted.append("train.objective.beta")
        else:
            carried[key] = value
    return f"train.objective={json.dumps(carried, default=str)}", dropped, defaulted


def _axis(given: dict[str, list[str] | None]) -> str:
    methods, objectives = given["method"], given["objective"]
    if methods is None and objectives is None:
        raise InputError("--methods or --objectives: name what to compare, e.g. --methods "
                         "lora,dora or --objectives dpo,simpo")
    if methods is not None and objectives is not None and len(methods) > 1 < len(objectives):
        raise InputError(f"--methods and --objectives: a comparison varies one of them; list "
                         f"several methods or several objectives, not both (got "
                         f"{len(methods)} methods and {len(objectives)} objectives)")
    return "method" if methods is not None and (objectives is None or len(methods) > 1) \
        else "objective"


def _other(axis: str) -> str:
    return AXES[1 - AXES.index(axis)]


def _not_compared(name: str, axis: str, names: list[str], fixed: list[str]) -> str:
    from peftune.adapters.registry import method_names

    kind = "method" if name in method_names() else "objective" if name in OBJECTIVE_KEYS else None
    if kind is None:  # neither: a typo of a name of this comparison, most likely
        given = names + fixed
        return (f"{name} is not one of the {axis}s compared ({', '.join(names)})"
                + (f" or the {_other(axis)} ({fixed[0]})" if fixed else "")
                + did_you_mean(name, given))
    listed = names if kind == axis else fixed
    if listed:
        return (f"{name} is not one of --{kind}s ({', '.join(listed)}); add it there, or "
                "remove this --set")
    return (f"{name} is a{'n' if kind == 'objective' else ''} {kind} and this comparison has "
            f"no --{kind}s; for every run, set the key as a plain override (not --set)")


def _objective_key_problem(name: str, key: str) -> str | None:
    own = OBJECTIVE_KEYS[name]
    if key == "name":
        return "train.objective.name: each run's objective is set by --objectives; remove " \
               "this override"
    if key in own:
        return None
    owners = [n for n, keys in OBJECTIVE_KEYS.items() if key in keys]
    theirs = (f"; only {', '.join(owners)} read{'s' if len(owners) == 1 else ''} it"
              if owners else "")
    keys = ", ".join(sorted(own)) or "none"
    return (f"train.objective.{key}: objective {name} has no key {key!r} (its keys: {keys})"
            f"{theirs}{did_you_mean(key, sorted(own))}; a recipe key starts with its section, "
            f"as {name}.train.lr=1e-5")


def recipe_choices(recipe_path: str | Path, overrides: Sequence[str]
                    ) -> tuple[str, Any, Locations]:
    """The recipe's adapter.method and train.objective as written (after `overrides`), for
    the axis a comparison keeps, and where each key was written; the loader validates them."""
    from peftune.recipe.yamlfile import apply_override, read_yaml

    data, where, _ = read_yaml(recipe_path)
    for number, override in enumerate(overrides):
        apply_override(data, where, override, number)
    adapter = data.get("adapter") if isinstance(data.get("adapter"), dict) else {}
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    method = adapter.get("method", "lora")
    return method if isinstance(method, str) else "lora", train.get("objective"), where


def own_method_problems(method: str, dropped: list[str], where: Locations) -> list[str]:
    """The recipe's own method (no --methods) keeps its keys: one it does not take is a
    typo to report as `load_recipe` would, not a key to drop."""
    from peftune.adapters.registry import get_method, method_names

    if method not in method_names():
        return [Problem(locate(("adapter", "method"), where), ("adapter", "method"),
                        f"unknown method {method!r}; choose one of: {', '.join(method_names())}"
                        f"{did_you_mean(method, method_names())}").line()]
    accepted = sorted(k for k in get_method(method).config.model_fields if k != "method")
    return [Problem(locate(tuple(key.split(".")), where), tuple(key.split(".")),
                    f"unknown key for adapter method {method}"
                    f"{did_you_mean(key.split('.')[1], accepted)}").line() for key in dropped]


def _one_list(lines: dict[str, list[str]], count: int) -> list[str]:
    """Every run's problems in one list: a problem all runs share once, as it is; one that
    only some runs have prefixed with the run's name, unless its location names it."""
    shared = set.intersection(*(set(v) for v in lines.values())) if len(lines) == count else set()
    out = []
    for name, found in lines.items():
        for line in found:
            named = line.startswith((f"--set '{name}.", f"--objectives {name}:", f"method {name}:"))
            out.append(line if line in shared or named else f"{name}: {line}")
    return list(dict.fromkeys(out))


def key_of(override: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in override.partition("=")[0].split("."))
