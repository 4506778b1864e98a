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
from typing import Any

import yaml
from pydantic import ValidationError

from peftune.adapters.registry import get_method, method_names
from peftune.errors import InputError
from peftune.models import pickle_weights_problem
from peftune.models.sources import model_source_problem
from peftune.recipe.architecture import model_problems, strategy_problems
from peftune.recipe.errors import (
    Locations,
    Problem,
    Where,
    did_you_mean,
    dotted,
    locate,
    pydantic_problems,
    show,
)
from peftune.recipe.guards import (
    ceiling_problems,
    output_dir_problem,
    read_recipe_text,
    too_large,
    value_paths,
)
from peftune.recipe.schema import Recipe, cross_field_problems

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_OVERRIDES_ORDER = 2  # problems sort as: recipe file (0), its parent (1), then overrides


def load_recipe(path: str | Path, overrides: Sequence[str] = (), *,
                check_output: bool = False) -> Recipe:
    """Read, merge, override and validate a recipe; raise one InputError listing every problem.

    On success `recipe.adapter` is the chosen method's config (e.g. `LoraConfig`), not the
    loosely typed `AdapterSection`. `check_output` (the `train` and `validate` verbs) also
    refuses an `output.dir` that no run may use (`output_dir_problem`); a run's own saved
    recipe.yaml, read back by eval or merge, is not checked against where it was written.
    """
    shown = str(path)
    data, where, problems = _read_yaml(Path(path), shown, order=0)
    data, where, problems = _apply_extends(data, where, problems, Path(path), shown)
    for number, override in enumerate(overrides):
        problems += _apply_override(data, where, override, number)
    recipe, validation = _validate(data, where)
    problems += validation
    if recipe is not None and not problems and check_output:
        problem = output_dir_problem(recipe.output.dir)
        if problem:
            problems.append(Problem(locate(("output", "dir"), where), ("output", "dir"), problem))
    if problems or recipe is None:
        raise InputError(*_unique_lines(problems))
    return recipe


def load_method_recipe(path: str | Path, method: str, overrides: Sequence[str] = (),
                       method_overrides: Sequence[tuple[str, str]] = ()
                       ) -> tuple[Recipe, list[str]]:
    """`load_recipe` for one of several adapter methods trained on one recipe (`peftune
    compare`): after `overrides`, the `adapter:` section keeps only the keys `method`'s config
    accepts and `adapter.method` becomes `method`; then `method_overrides`, `(shown,
    "KEY.PATH=VALUE")` pairs located as `shown` in messages, apply to this method alone.
    Returns the recipe and the adapter keys dropped (`adapter.r`, ...), for the caller to say.
    """
    shown = str(path)
    data, where, problems = _read_yaml(Path(path), shown, order=0)
    data, where, problems = _apply_extends(data, where, problems, Path(path), shown)
    for number, override in enumerate(overrides):
        problems += _apply_override(data, where, override, number)
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
        where[("adapter", "method")] = Where((_OVERRIDES_ORDER, -1), f"method {method}")
    for number, (label, override) in enumerate(method_overrides, start=len(overrides)):
        problems += _apply_override(data, where, override, number, shown=label)
    recipe, validation = _validate(data, where)
    problems += validation
    if problems or recipe is None:
        raise InputError(*_unique_lines(problems))
    return recipe, [f"adapter.{key}" for key in dropped]


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (every section, defaults included, schema key order) as YAML
    that `load_recipe` reads back to an equal Recipe. Runs save it as `recipe.yaml`."""
    return yaml.dump(recipe.model_dump(mode="json"), Dumper=_RecipeDumper, sort_keys=False,
                     allow_unicode=True, width=100)


class _RecipeDumper(yaml.SafeDumper):
    """Writes lists of scalars inline (`adam_betas: [0.9, 0.999]`) and strings with newlines
    double-quoted (`"{prompt}\\n"`), so the file reads like a hand-written recipe."""

    def represent_list(self, data: list) -> yaml.Node:
        flow = all(isinstance(item, (str, int, float, bool)) or item is None for item in data)
        return self.represent_sequence(_SEQ_TAG, data, flow_style=flow)

    def represent_str(self, data: str) -> yaml.Node:
        style = '"' if "\n" in data else None
        return self.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_RecipeDumper.add_representer(list, _RecipeDumper.represent_list)
_RecipeDumper.add_representer(str, _RecipeDumper.represent_str)


# ---------------------------------------------------------------------------------------
# reading YAML with locations


def _read_yaml(path: Path, shown: str, *, order: int) -> tuple[dict, Locations, list[Problem]]:
    """Parse one recipe file as `yaml.safe_load` would, plus where each key and list item was
    written and one Problem per duplicate key (safe_load would silently keep the last)."""
    text = read_recipe_text(path, shown)
    loader = yaml.SafeLoader(text)
    builder = _Builder(loader, shown, order)
    try:
        node = loader.get_single_node()
        if node is None:  # an empty file, or comments only
            raise InputError(f"{shown}: the file is empty (nothing but comments or blank "
                             "lines); a recipe needs at least model: and data: sections")
        data = builder.build(node, ())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        kind = "YAML error" if isinstance(err, yaml.constructor.ConstructorError) else "YAML syntax error"
        problem = err.problem or err.context or "malformed YAML"
        if isinstance(err, yaml.constructor.ConstructorError) and "constructor for the tag" in problem:
            tag = problem.partition("'")[2].rpartition("'")[0].replace("tag:yaml.org,2002:", "!!")
            problem = (f"the tag {tag} is not allowed: a recipe holds plain "
                       "values (it is read with YAML's safe loader and never builds Python "
                       "objects); remove the tag")
        if err.context and err.problem and err.problem.startswith("but "):
            problem = f"{err.context}, {err.problem}"  # "expected X, but found Y"
        elif err.context and err.problem and err.context_mark and mark is not err.context_mark:
            problem += f" ({err.context} on line {err.context_mark.line + 1})"
        raise InputError(f"{shown}:{mark.line + 1 if mark else 1}: {kind}: {problem}") from None
    except yaml.YAMLError as err:
        raise InputError(f"{shown}: YAML error: {err}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise InputError(f"{shown}:{node.start_mark.line + 1}: the recipe must be a mapping of "
                         f"sections (model:, data:, train:, ...), got {show(data)}")
    builder.where[()] = Where((order, 1), f"{shown}:1")
    _normalise_sections(data, builder.where)
    return data, builder.where, builder.problems


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


class _Builder:
    """Builds Python data from a composed YAML node tree, recording key locations."""

    def __init__(self, loader: yaml.SafeLoader, shown: str, order: int):
        self.loader, self.shown, self.order = loader, shown, order
        self.where: Locations = {}
        self.problems: list[Problem] = []
        self._active: set[int] = set()  # nodes being built, to refuse recursive anchors

    def here(self, node: yaml.Node) -> Where:
        line = node.start_mark.line + 1
        return Where((self.order, line), f"{self.shown}:{line}")

    def build(self, node: yaml.Node, path: tuple[Any, ...]) -> Any:
        if id(node) in self._active:
            raise InputError(f"{self.here(node).text}: YAML error: recursive anchors are not supported")
        if isinstance(node, yaml.MappingNode) and node.tag == _MAP_TAG:
            self._active.add(id(node))
            self._check_duplicates(node, path)
            self.loader.flatten_mapping(node)  # resolves `<<: *anchor` merge keys
            out = {}
            for key_node, value_node in node.value:  # later keys win, as in safe_load
                if not isinstance(key_node, yaml.ScalarNode):
                    raise InputError(f"{self.here(key_node).text}: {dotted(path) or 'recipe'}: "
                                     "keys must be plain names, not lists or mappings")
                # Keys stay as written: `on:` or `1:` is a (misspelled) key name, never a bool/int.
                self.where[path + (key_node.value,)] = self.here(key_node)
                out[key_node.value] = self.build(value_node, path + (key_node.value,))
            self._active.discard(id(node))
            return out
        if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ_TAG:
            self._active.add(id(node))
            items = []
            for index, item in enumerate(node.value):
                self.where[path + (index,)] = self.here(item)
                items.append(self.build(item, path + (index,)))
            self._active.discard(id(node))
            return items
        return self.loader.construct_object(node, deep=True)

    def _check_duplicates(self, node: yaml.MappingNode, path: tuple[Any, ...]) -> None:
        first: dict[str, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            line = key_node.start_mark.line + 1
            if key_node.value in first:
                self.problems.append(Problem(self.here(key_node), path + (key_node.value,),
                                             f"duplicate key (first given on line {first[key_node.value]})"))
            else:
                first[key_node.value] = line


# ---------------------------------------------------------------------------------------
# extends


def _apply_extends(data: dict, where: Locations, problems: list[Problem], path: Path,
                   shown: str) -> tuple[dict, Locations, list[Problem]]:
    """Merge the recipe over its `extends:` parent (one level), keeping each key's location."""
    if "extends" not in data:
        return data, where, problems
    target = data.pop("extends")
    at = where.pop(("extends",))
    if not isinstance(target, str) or not target.strip():
        raise InputError(f"{at.text}: extends: expected the path of another recipe file, "
                         f"got {show(target)}")
    parent_path = path.parent / target
    if not parent_path.is_file():
        raise InputError(f"{at.text}: extends: no such file {target} "
                         f"(resolved to {parent_path.resolve()})")
    parent_shown = os.path.normpath(os.path.join(os.path.dirname(shown), target))
    parent, parent_where, parent_problems = _read_yaml(parent_path, parent_shown, order=1)
    if "extends" in parent:
        raise InputError(f"{parent_where[('extends',)].text}: extends: {parent_shown} itself "
                         f"extends {parent['extends']}; only one level of extends is allowed "
                         f"(copy what {shown} needs into {parent_shown})")
    merged = _deep_merge(parent, data)
    merged_where = {p: where.get(p) or parent_where[p] for p in value_paths(merged, ())}
    merged_where[()] = where[()]
    return merged, merged_where, problems + parent_problems


def _deep_merge(parent: dict, child: dict) -> dict:
    """Child keys override parent keys; mappings merge recursively, lists and scalars replace."""
    out = dict(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------
# overrides


def _apply_override(data: dict, where: Locations, override: str, number: int, *,
                    shown: str | None = None) -> list[Problem]:
    """Apply one `KEY.PATH=VALUE`; the value is YAML (`[a, b]`, `null`, `true`, `32`).

    A value YAML reads as a string stays a string, and pydantic's lax mode coerces it to the
    key's type (YAML 1.1 reads `1e-4` as a string; `train.lr` still gets the float 1e-4).
    Messages locate it as `shown` (default: `override 'KEY.PATH=VALUE'`).
    """
    at = Where((_OVERRIDES_ORDER, number), shown or f"override {override!r}")
    key, sep, raw = override.partition("=")
    keys = tuple(part.strip() for part in key.split("."))
    if not sep or not all(keys):
        return [Problem(at, (), "expected KEY.PATH=VALUE, such as train.lr=1e-4 or data.val=null")]
    if keys[0] == "extends":
        return [Problem(at, keys, "extends can only be set in the recipe file")]
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        return [Problem(at, keys, f"the value is not valid YAML: {problem}")]
    node = data
    for depth, part in enumerate(keys[:-1]):
        if node.get(part) is None:
            node[part] = {}
            where[keys[: depth + 1]] = at
        elif not isinstance(node[part], dict):
            return [Problem(at, keys[: depth + 1], f"is {show(node[part])}, not a mapping, so "
                                                    f"{dotted(keys)} cannot be set")]
        node = node[part]
    node[keys[-1]] = value
    for stale in [p for p in where if p[: len(keys)] == keys]:
        del where[stale]
    for path in [keys, *value_paths(value, keys)]:
        where[path] = at
    return []


# ---------------------------------------------------------------------------------------
# validation


def _validate(data: dict, where: Locations) -> tuple[Recipe | None, list[Problem]]:
    """Validate the sections, then `adapter:` against its method, then the cross-field rules.

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
        from peftune.recipe.selection import select_problems

        problems += select_problems(selection, data, where)
    if recipe is None or method_config is None or problems:
        return None, problems
    # model_copy skips validation on purpose: the field is declared as AdapterSection.
    recipe = recipe.model_copy(update={"adapter": method_config})
    for path, message in cross_field_problems(recipe):
        problems.append(Problem(locate(tuple(path), where), tuple(path), message))
    problems += ceiling_problems(recipe, where)
    pickled = pickle_weights_problem(recipe.model.path, allow_pickle=recipe.model.allow_pickle)
    source = model_source_problem(recipe.model.path)
    for problem in (pickled, source):  # .bin-only weights; an unreadable .gguf, unknown name
        if problem:
            problems.append(Problem(locate(("model", "path"), where), ("model", "path"), problem))
    if not problems:  # the adapter against the model's layers, when config.json is at hand
        for path, message in [*model_problems(recipe), *strategy_problems(recipe)]:
            problems.append(Problem(locate(tuple(path), where), tuple(path), message))
    if not problems:  # `~/runs/x` is the home directory's runs/x, as in data paths
        recipe.output.dir = os.path.expanduser(recipe.output.dir)
    return (None if problems else recipe), problems


def _unique_lines(problems: list[Problem]) -> list[str]:
    """Problems in file order (recipe, parent, overrides), each line once."""
    return list(dict.fromkeys(p.line() for p in sorted(problems, key=lambda p: p.where)))
