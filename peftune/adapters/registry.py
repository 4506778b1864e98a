"""The adapter-method registry: recipe name -> config schema + lazily imported implementation.

A method registers a pydantic config (torch-free, so `peftune validate` and `peftune
methods` stay cheap) and the dotted path of its `apply` function, imported only when a
model is actually built. The training loop never looks at a method's name: `apply`
returns the hooks the loop calls (see `peftune.adapters.hooks.AdapterHooks`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict


class MethodConfig(BaseModel):
    """Base class of every method's config: its keys are the method's, unknown keys are errors.

    The recipe loader validates the whole `adapter:` section against the chosen method's
    subclass, which replaces the loosely typed `AdapterSection` in the resolved recipe.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    method: str


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config: type[MethodConfig]
    apply: str  # "module:function", imported on first use
    description: str
    paper: str
    mergeable: bool
    works_over_4bit: bool
    exports_plain_lora: bool
    trains_base_weights: bool = False

    def load_apply(self) -> Any:
        module, _, func = self.apply.partition(":")
        return getattr(importlib.import_module(module), func)


_METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _METHODS:
        raise ValueError(f"adapter method {spec.name!r} is registered twice")
    _METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    _load_builtin_methods()
    return _METHODS[name]


def method_names() -> list[str]:
    _load_builtin_methods()
    return sorted(_METHODS)


def all_methods() -> list[MethodSpec]:
    _load_builtin_methods()
    return [_METHODS[name] for name in sorted(_METHODS)]


def _load_builtin_methods() -> None:
    # Importing the spec modules registers them; they are torch-free by contract.
    from peftune.adapters import specs  # noqa: F401
