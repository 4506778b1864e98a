"""peftune's YAML files with line numbers: recipes, and the eval, merge and selection files
that are read the same way (`peftune.evaluate.config`, `peftune.merge.config`,
`peftune.recipe.selection`).

`read_yaml` parses a file as `yaml.safe_load` would (SafeLoader only, so a file can never
build Python objects), merges it over its `extends:` parent (one level, relative to the
file), and returns the data with a map from each key path to where it was written
(`Locations`) and one Problem per duplicate key. `apply_override` applies a command-line
`KEY.PATH=VALUE` the same way, located as the override. Callers validate the data, add their
own Problems located with `peftune.recipe.errors.locate`, and raise
`InputError(*unique_lines(problems))`. `dump_yaml` writes data back in the style of a
hand-written recipe.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from peftune.errors import InputError
from peftune.recipe.errors import Locations, Problem, Where, dotted, show
from peftune.recipe.guards import read_recipe_text, value_paths

# Problems sort by where they come from: the file (0), its parent (1), then the overrides.
OVERRIDES_ORDER = 2

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"

# Spells out a file's short forms in place before `extends:` merges it (a recipe's
# `model: ./m` means `model: {path: ./m}`), so that a child can extend them key by key.
Normalise = Callable[[dict, Locations], None]


def read_yaml(path: str | Path, *, normalise: Normalise | None = None
              ) -> tuple[dict, Locations, list[Problem]]:
    """The mapping in `path` merged over its `extends:` parent, where each key and list item
    was written, and the duplicate keys found; one InputError line for a file that is not
    YAML, not a mapping, or extends a missing or extending file."""
    shown = str(path)
    data, where, problems = _read_one(Path(path), shown, order=0, normalise=normalise)
    return _apply_extends(data, where, problems, Path(path), shown, normalise=normalise)


def apply_override(data: dict, where: Locations, override: str, number: int, *,
                   shown: str | None = None) -> list[Problem]:
    """Apply one `KEY.PATH=VALUE`; the value is YAML (`[a, b]`, `null`, `true`, `32`).

    A value YAML reads as a string stays a string, and pydantic's lax mode coerces it to the
    key's type (YAML 1.1 reads `1e-4` as a string; `train.lr` still gets the float 1e-4).
    Messages locate it as `shown` (default: `override 'KEY.PATH=VALUE'`).
    """
    at = Where((OVERRIDES_ORDER, number), shown or f"override {override!r}")
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


def unique_lines(problems: list[Problem]) -> list[str]:
    """Problems in file order (file, parent, overrides), each line once."""
    return list(dict.fromkeys(p.line() for p in sorted(problems, key=lambda p: p.where)))


class YamlDumper(yaml.SafeDumper):
    """Writes lists of scalars inline (`adam_betas: [0.9, 0.999]`) and strings with newlines
    double-quoted (`"{prompt}\\n"`), so the file reads like a hand-written recipe."""

    def represent_list(self, data: list) -> yaml.Node:
        flow = all(isinstance(item, (str, int, float, bool)) or item is None for item in data)
        return self.represent_sequence(_SEQ_TAG, data, flow_style=flow)

    def represent_str(self, data: str) -> yaml.Node:
        style = '"' if "\n" in data else None
        return self.represent_scalar("tag:yaml.org,2002:str", data, style=style)


YamlDumper.add_representer(list, YamlDumper.represent_list)
YamlDumper.add_representer(str, YamlDumper.represent_str)


def dump_yaml(data: Any) -> str:
    """`data` as YAML in the given key order, written by `YamlDumper`."""
    return yaml.dump(data, Dumper=YamlDumper, sort_keys=False, allow_unicode=True, width=100)


# ---------------------------------------------------------------------------------------
# reading one file


def _read_one(path: Path, shown: str, *, order: int, normalise: Normalise | None
              ) -> tuple[dict, Locations, list[Problem]]:
    """Parse one file as `yaml.safe_load` would, plus where each key and list item was
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
    if normalise is not None:
        normalise(data, builder.where)
    return data, builder.where, builder.problems


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
                   shown: str, *, normalise: Normalise | None
                   ) -> tuple[dict, Locations, list[Problem]]:
    """Merge the file over its `extends:` parent (one level), keeping each key's location."""
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
    parent, parent_where, parent_problems = _read_one(parent_path, parent_shown, order=1,
                                                      normalise=normalise)
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
