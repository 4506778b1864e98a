"""Selection recipes: the stand-alone `select:` block of `peftune select-data` (recipe, then
`KEY=VALUE` overrides, then the command-line flags) and `data.select` inside a training
recipe, validated as `peftune.select.config.SelectConfig` with every problem located at its
line or flag, as recipes are (`peftune.recipe.yamlfile`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from peftune.errors import InputError
from peftune.recipe.errors import Locations, Problem, Where, locate, pydantic_problems, show
from peftune.recipe.guards import value_paths
from peftune.recipe.yamlfile import OVERRIDES_ORDER, apply_override, read_yaml, unique_lines

if TYPE_CHECKING:
    from peftune.select.config import SelectConfig


def load_select(path: str | Path | None, overrides: Sequence[str] = (),
                flags: dict[str, Any] | None = None) -> SelectConfig:
    """A stand-alone selection: a recipe's `select:` block (optional), then `KEY=VALUE`
    overrides, then command-line flags (each becomes `select.<key>`), validated as one
    SelectConfig with every problem reported at once, located in the file or at the flag."""
    from peftune.select.config import SelectConfig

    if path is not None:
        data, where, problems = read_yaml(path)
    else:
        data, where, problems = {}, {(): Where((OVERRIDES_ORDER, -1), "command line")}, []
    for number, override in enumerate(overrides):
        problems += apply_override(data, where, override, number)
    section = data.setdefault("select", {})
    where.setdefault(("select",), where[()])
    if not isinstance(section, dict):
        raise InputError(f"{locate(('select',), where).text}: select: expected a mapping of "
                         f"keys (method:, pool:, k:, ...), got {show(section)}")
    for number, (key, value) in enumerate((flags or {}).items()):
        if value is None or value == []:
            continue
        at = Where((OVERRIDES_ORDER + 1, number), f"--{key.replace('_', '-')}")
        section[key] = value
        for stale in [p for p in where if p[:2] == ("select", key)]:
            del where[stale]
        for sub in [("select", key), *value_paths(value, ("select", key))]:
            where[sub] = at
    extra = sorted(set(data) - {"select"})
    if extra:
        hint = (f" (did you mean select.{extra[0]}?)"
                if extra[0] in SelectConfig.model_fields else "")
        problems.append(Problem(locate((extra[0],), where), (extra[0],),
                                f"a selection recipe has only a select: section{hint}"))
    config = None
    try:
        config = SelectConfig.model_validate(section)
    except ValidationError as err:
        problems += pydantic_problems(err.errors(include_url=False), data, where,
                                      root=SelectConfig, prefix=("select",))
    if config is not None:
        for key, flag in (("pool", "--pool"), ("target", "--target"), ("out", "--out")):
            if not getattr(config, key):
                problems.append(Problem(locate(("select",), where), ("select", key),
                                        f"required: give {flag} or select.{key} in a recipe"))
    if problems or config is None:
        raise InputError(*unique_lines(problems))
    return config


def select_problems(selection: dict, data: dict, where: Locations) -> list[Problem]:
    """`data.select` is a SelectConfig whose pool is data.train: pool and out are not keys
    here, and the text it scores comes from the data section unless set."""
    from peftune.select.config import TRAINING_FORBIDDEN, SelectConfig
    prefix = ("data", "select")
    problems = [Problem(locate(prefix + (key,), where), prefix + (key,), message)
                for key, message in TRAINING_FORBIDDEN.items() if key in selection]
    fmt = (data.get("data") or {}).get("format")
    if fmt in ("preference", "kto"):  # selection scores one text per row, not a pair
        problems.append(Problem(locate(prefix, where), prefix,
                                f"data.select scores one text per row and cannot select "
                                f"data.format: {fmt} rows; select plain rows with `peftune "
                                "select-data`, or remove data.select"))
    if not selection.get("target"):
        problems.append(Problem(locate(prefix, where), prefix + ("target",),
                                "required key is missing (the target sample: a file or a list "
                                "of files)"))
    try:
        SelectConfig.model_validate({k: v for k, v in selection.items()
                                     if k not in TRAINING_FORBIDDEN})
    except ValidationError as err:
        problems += pydantic_problems(err.errors(include_url=False), data, where,
                                      root=SelectConfig, prefix=prefix)
    return problems
