"""Loading a recipe: YAML with line numbers, one level of `extends:`, dotted overrides, and
validation that reports every problem at once as `file:line: key.path: message`.

The order is: read the file (SafeLoader only, so a recipe can never build Python objects),
merge it over its `extends:` parent, apply `KEY.PATH=VALUE` overrides from the command line,
validate the sections, validate `adapter:` against the chosen method's own config, then run
the cross-field checks. Every step keeps a map from key path to where the value was written,
so an error points at the line to edit, in the parent file when the key came from there, or
at the override when it came from the command line.

Paths inside a recipe (`model.path`, `data.train`, `data.val`, `output.dir`) are NOT
rewritten relative to the recipe file: like the paths on a command line, they are relative
to the current working directory. Only `extends:` resolves relative to the recipe file.

This module imports neither torch nor transformers (`peftune validate` must stay cheap).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from peftune.adapters.registry import get_method, method_names
from peftune.errors import InputError
from peftune.recipe.architecture import model_problems, strategy_problems
from peftune.recipe.errors import Locations, Problem, Where, did_you_mean, locate, pydantic_problems
from peftune.recipe.guards import ceiling_problems, output_dir_problem, too_large
from peftune.recipe.model_facts import InspectModel, local_model_facts, read_model_config
from peftune.recipe.schema import Recipe, cross_field_problems
from peftune.recipe.selection import select_problems
from peftune.recipe.yamlfile import (
    OVERRIDES_ORDER,
    apply_override,
    dump_yaml,
    read_yaml,
    unique_lines,
)


def load_recipe(path: str | Path, overrides: Sequence[str] = (), *,
                check_output: bool = False,
                inspect_model: InspectModel = local_model_facts) -> Recipe:
    """Read, merge, override and validate a recipe; raise one InputError listing every problem.

    On success `recipe.adapter` is the chosen method's config (e.g. `LoraConfig`), not the
    loosely typed `AdapterSection`. `check_output` (the `train` and `validate` verbs) also
    refuses an `output.dir` that no run may use (`output_dir_problem`); a run's own saved
    recipe.yaml, read back by eval or merge, is not checked against where it was written.
    `inspect_model` tells what is known of the model `model.path` names (`model_facts`): what
    makes it unusable, and its config.json for the checks against its layers.
    """
    data, where, problems = _read_with_overrides(path, overrides)
    recipe, validation = _validate(data, where, inspect_model)
    problems += validation
    if recipe is not None and not problems and check_output:
        problem = output_dir_problem(recipe.output.dir)
        if problem:
            problems.append(Problem(locate(("output", "dir"), where), ("output", "dir"), problem))
    if problems or recipe is None:
        raise InputError(*unique_lines(problems))
    return recipe


def load_method_recipe(path: str | Path, method: str, overrides: Sequence[str] = (),
                       method_overrides: Sequence[tuple[str, str]] = (), *,
                       inspect_model: InspectModel = local_model_facts
                       ) -> tuple[Recipe, list[str]]:
    """`load_recipe` for one of several adapter methods trained on one recipe (`peftune
    compare`): after `overrides`, the `adapter:` section keeps only the keys `method`'s config
    accepts and `adapter.method` becomes `method`; then `method_overrides`, `(shown,
    "KEY.PATH=VALUE")` pairs located as `shown` in messages, apply to this method alone.
    Returns the recipe and the adapter keys dropped (`adapter.r`, ...), for the caller to say.
    """
    data, where, problems = _read_with_overrides(path, overrides)
    adapter = data.setdefault("adapter", {})
    dropped = []
    if isinstance(adapter, dict):
        if method in method_names():
            accepted = get_method(method).config.model_fields
            dropped = [key for key in adapter if key != "method" and key not in accepted]
        for key in dropped:
            del adapter[key]
            for stale in [p for p in where if p[:2] == ("adapter", key)]:
                del where[stale]
        adapter["method"] = method
        where[("adapter", "method")] = Where((OVERRIDES_ORDER, -1), f"method {method}")
    for number, (label, override) in enumerate(method_overrides, start=len(overrides)):
        problems += apply_override(data, where, override, number, shown=label)
    recipe, validation = _validate(data, where, inspect_model)
    problems += validation
    if problems or recipe is None:
        raise InputError(*unique_lines(problems))
    return recipe, [f"adapter.{key}" for key in dropped]


def _read_with_overrides(path: str | Path, overrides: Sequence[str]
                         ) -> tuple[dict, Locations, list[Problem]]:
    data, where, problems = read_yaml(path, normalise=_normalise_sections)
    for number, override in enumerate(overrides):
        problems += apply_override(data, where, override, number)
    return data, where, problems


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (every section, defaults included, schema key order) as YAML
    that `load_recipe` reads back to an equal Recipe. Runs save it as `recipe.yaml`."""
    return dump_yaml(recipe.model_dump(mode="json"))


def _normalise_sections(data: dict, where: Locations) -> None:
    """Spell out the short forms before merging, so a child can extend them key by key:
    `model: ./m` means `model: {path: ./m}`, and a section left empty (every key commented
    out) means the section with its defaults."""
    if isinstance(data.get("model"), str):
        data["model"] = {"path": data["model"]}
        where[("model", "path")] = where[("model",)]
    for name in Recipe.model_fields:
        if name in data and data[name] is None:
            data[name] = {}


# ---------------------------------------------------------------------------------------
# validation


def _validate(data: dict, where: Locations, inspect_model: InspectModel
              ) -> tuple[Recipe | None, list[Problem]]:
    """Validate the sections, then `adapter:` against its method, then the cross-field rules,
    then the recipe against the model.

    The adapter is validated in a second pass because its keys depend on `adapter.method`;
    both passes run even when the first fails, so every problem is reported in one go.
    """
    problems: list[Problem] = too_large(data, where)
    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        problems += pydantic_problems(err.errors(include_url=False), data, where, root=Recipe)
    adapter = data.get("adapter", {})
    method_config = None
    if isinstance(adapter, dict) and isinstance(adapter.get("method", "lora"), str):
        method = adapter.get("method", "lora")
        names = method_names()
        if method not in names:
            path = ("adapter", "method")
            problems.append(Problem(locate(path, where), path,
                                    f"unknown method {method!r}; choose one of: {', '.join(names)}"
                                    f"{did_you_mean(method, names)}"))
        else:
            config_cls = get_method(method).config
            try:
                method_config = config_cls.model_validate(adapter)
            except ValidationError as err:
                problems += pydantic_problems(err.errors(include_url=False), data, where,
                                              root=config_cls, prefix=("adapter",))
    selection = data.get("data", {}).get("select") if isinstance(data.get("data"), dict) else None
    if isinstance(selection, dict):
        problems += select_problems(selection, data, where)
    if recipe is None or method_config is None or problems:
        return None, problems
    # model_copy skips validation on purpose: the field is declared as AdapterSection.
    recipe = recipe.model_copy(update={"adapter": method_config})
    for path, message in cross_field_problems(recipe):
        problems.append(Problem(locate(tuple(path), where), tuple(path), message))
    problems += ceiling_problems(recipe, where)
    model = inspect_model(recipe.model)
    for problem in model.problems:  # .bin-only weights; an unreadable .gguf, unknown name
        problems.append(Problem(locate(("model", "path"), where), ("model", "path"), problem))
    if not problems:  # the adapter against the model's layers, when config.json is at hand
        config = read_model_config(model.config_dir)
        for path, message in [*model_problems(recipe, config), *strategy_problems(recipe, config)]:
            problems.append(Problem(locate(tuple(path), where), tuple(path), message))
    if not problems:  # `~/runs/x` is the home directory's runs/x, as in data paths
        recipe.output.dir = os.path.expanduser(recipe.output.dir)
    return (None if problems else recipe), problems

