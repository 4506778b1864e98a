"""Turning recipe problems into one human line each: `file:line: key.path: message`.

pydantic reports errors by location tuple with messages written for programmers
("Input should be greater than 0", union member tags such as `list[str]` inside the
location). This module maps each error back onto the recipe's own keys, finds where the
user wrote that key (a file line or a command-line override), and rewrites the message
into the short form the CLI prints: `train.batch_size: must be > 0, got 0`.
"""

from __future__ import annotations

import difflib
import re
import types
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel


@dataclass(frozen=True, order=True)
class Where:
    """Where a value came from. `order` sorts problems: recipe file, parent file, overrides."""

    order: tuple[int, int]
    text: str = field(compare=False)  # "recipe.yaml:12" or "override 'adapter.r=abc'"


@dataclass(frozen=True)
class Problem:
    where: Where
    path: tuple[Any, ...]
    message: str

    def line(self) -> str:
        key = dotted(self.path)
        return f"{self.where.text}: {key}: {self.message}" if key else f"{self.where.text}: {self.message}"


Locations = dict[tuple[Any, ...], Where]


def dotted(path: tuple[Any, ...]) -> str:
    """('adapter', 'target_modules', 0) -> 'adapter.target_modules[0]'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def locate(path: tuple[Any, ...], where: Locations) -> Where:
    """The location of `path`, or of its closest written ancestor (a missing key's mapping)."""
    for end in range(len(path), -1, -1):
        if path[:end] in where:
            return where[path[:end]]
    raise KeyError(path)  # the root is always located; reaching here is a loader bug


def did_you_mean(word: Any, choices: list[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def show(value: Any) -> str:
    """A value as the user would write it in YAML, short: 'abc', 0, null, true, [1, 2]."""
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, float):  # 0.0 -> 0, 1e-05 stays short; YAML would write 1.0e-05
        text = str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    elif value is None or isinstance(value, (bool, int, float, list, tuple, dict)):
        text = yaml.safe_dump(
            list(value) if isinstance(value, tuple) else value, default_flow_style=True, width=10**6
        ).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------
# pydantic errors -> Problems


_EXPECTED = {  # error type -> what the key expects, in the user's words
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string", "list_type": "a list", "tuple_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    "none_required": "null",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def pydantic_problems(
    errors: list[dict[str, Any]], data: Any, where: Locations, *,
    root: type[BaseModel], prefix: tuple[str, ...] = (),
) -> list[Problem]:
    """One Problem per recipe key that pydantic rejected.

    `data` is the whole recipe dict, `root` the model validated at `prefix` (the Recipe at
    (), a method config at ('adapter',)). A union field reports one error per member: those
    collapse into one line ("expected a string or a list"), unless one member got further
    into the value (an item of a list), in which case that member's more precise error wins,
    or one member is a section given by its name alone whose name is unknown.
    """
    resolved = [(_data_path(prefix + tuple(err["loc"]), data, err["type"]), err) for err in errors]
    unions: dict[tuple[Any, ...], list[tuple[tuple[Any, ...], dict[str, Any]]]] = {}
    problems = []
    for (path, union_at), err in resolved:
        if union_at is None:
            problems.append(_problem(path, err, where, root, prefix))
        else:
            unions.setdefault(union_at, []).append((path, err))
    for union_at, members in unions.items():
        deeper = [(path, err) for path, err in members if len(path) > len(union_at)]
        if deeper:
            problems += [_problem(path, err, where, root, prefix) for path, err in deeper]
            continue
        named = [err for _, err in members if err["type"] == "literal_error"]
        if named:  # a NAME shorthand (`train.objective: foo`) naming nothing: say what may
            problems.append(_problem(union_at, named[0], where, root, prefix))
            continue
        wanted = list(dict.fromkeys(_EXPECTED.get(err["type"], "another type") for _, err in members))
        message = f"expected {' or '.join(wanted)}, got {show(members[0][1]['input'])}"
        problems.append(Problem(locate(union_at, where), union_at, message))
    return problems


def _data_path(loc: tuple[Any, ...], data: Any, error_type: str) -> tuple[tuple[Any, ...], tuple | None]:
    """Split a pydantic location into the recipe key path and the union field it passed, if any.

    Location parts that are not keys (or indexes) of the data are union member tags such as
    'str' or 'list[str]'; only a 'missing' error may end in a key the data lacks.
    """
    path: list[Any] = []
    union_at = None
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif error_type == "missing" and i == len(loc) - 1:
            pass
        else:
            union_at = tuple(path) if union_at is None else union_at
            continue
        path.append(part)
    return tuple(path), union_at


def _problem(path: tuple[Any, ...], err: dict[str, Any], where: Locations,
             root: type[BaseModel], prefix: tuple[str, ...]) -> Problem:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    got = f"got {show(value)}"
    if kind == "extra_forbidden":
        message = _unknown_key(path, root, prefix)
    elif kind == "missing":
        message = _missing(path, root, prefix)
    elif kind == "literal_error":
        allowed = [v.strip("'") for v in re.split(r", | or ", str(ctx.get("expected", "")))]
        message = f"must be one of {', '.join(allowed)}; {got}{did_you_mean(value, allowed)}"
    elif kind in _BOUNDS:
        bound = next(iter(ctx.values()), "?")
        message = f"must be {_BOUNDS[kind]} {show(bound)}, {got}"
    elif kind in ("too_short", "too_long"):
        limit = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        least = "at least" if kind == "too_short" else "at most"
        message = f"expected {least} {limit} items, got {ctx.get('actual_length', '?')}: {show(value)}"
    elif kind in _EXPECTED:
        message = f"expected {_EXPECTED[kind]}, {got}"
    elif kind == "finite_number":
        message = f"must be a finite number, {got}"
    else:  # validators' own messages (value_error, assertion_error) and anything rarer
        text = re.sub(r"^(Value error|Assertion failed), ", "", err["msg"])
        message = f"{text.replace('Input should be', 'should be')}, {got}"
    return Problem(locate(path, where), path, message)


def _unknown_key(path: tuple[Any, ...], root: type[BaseModel], prefix: tuple[str, ...]) -> str:
    owner = model_at(root, path[len(prefix):-1])
    names = list(owner.model_fields) if owner else []
    what = "unknown section" if len(path) == 1 else "unknown key"
    if prefix == ("adapter",) and len(path) == 2:
        method = root.model_fields["method"].default  # each method config defaults to its name
        what = f"unknown key for adapter method {method}"
        owners = _methods_with_key(str(path[-1]))
        if owners:  # typically a recipe switched methods and kept the old method's keys
            shown = ", ".join(owners) if len(owners) <= 5 else (
                f"{', '.join(owners[:4])} and {len(owners) - 4} more methods")
            return f"{what}; {path[-1]} is a key of {shown} (remove it when switching methods)"
    hint = did_you_mean(path[-1], names)
    valid = "valid sections" if len(path) == 1 else "valid keys"
    return f"{what}{hint}" if hint or not names else f"{what}; {valid}: {', '.join(names)}"


def _methods_with_key(key: str) -> list[str]:
    from peftune.adapters.registry import all_methods

    return [spec.name for spec in all_methods() if key != "method" and key in spec.config.model_fields]


def _missing(path: tuple[Any, ...], root: type[BaseModel], prefix: tuple[str, ...]) -> str:
    owner = model_at(root, path[len(prefix):-1])
    info = owner.model_fields.get(str(path[-1])) if owner else None
    section = model_at(root, path[len(prefix):]) if info else None
    if section is not None:
        needed = [name for name, f in section.model_fields.items() if f.is_required()]
        return "required section is missing" + (f" (it needs {', '.join(needed)})" if needed else "")
    if info is not None and info.description:
        return f"required key is missing ({info.description})"
    return "required key is missing"


def model_at(root: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that validates the mapping at `path` below `root`, if any."""
    cls: Any = root
    for part in path:
        info = cls.model_fields.get(part) if isinstance(part, str) else None
        if info is None:
            return None
        cls = _model_in(info.annotation)
        if cls is None:
            return None
    return cls


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation such as `X`, `X | None` or `SerializeAsAny[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        models = [m for m in map(_model_in, get_args(annotation)) if m is not None]
        return models[0] if len(models) == 1 else None
    if hasattr(annotation, "__metadata__"):  # Annotated[X, ...]
        return _model_in(get_args(annotation)[0])
    return None
