"""The adapter-method registry: recipe name -> config schema + lazily imported implementation.

A method registers a pydantic config (torch-free, so `peftune validate` and `peftune
methods` stay cheap) and the dotted path of its `apply` function, imported only when a
model is actually built. The training loop never looks at a method's name: `apply`
returns the hooks the loop calls (see `peftune.adapters.hooks.AdapterHooks`).

This module imports no method: each family's `configs.py` calls `register`, and
`peftune.adapters.specs` imports every family once. Importing `peftune.adapters` (which any
import of this module does first) runs it, so the lookups below always see every method.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class MethodConfig(BaseModel):
    """Base class of every method's config: its keys are the method's, unknown keys are errors.

    The recipe loader validates the whole `adapter:` section against the chosen method's
    subclass, which replaces the loosely typed `AdapterSection` in the resolved recipe.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    method: str

    # True when the method schedules by the run's length (AdaLoRA's budget, LaMDA's freeze):
    # `--resume` then refuses a changed train.max_steps / train.epochs.
    schedules_by_length: ClassVar[bool] = False

    def recipe_problems(self, recipe: Any) -> list[tuple[tuple[str, ...], str]]:
        """Checks of this method against the rest of the recipe: (key path, message) each."""
        return []

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        """Trainable parameters on the base described by `layers` (the linear layers this
        method targets, each with `name`, `fan_in`, `fan_out`) and `model` (hidden size,
        layers, vocabulary...), or None when it cannot be counted ahead of building."""
        return None

    @property
    def targets(self) -> str | list[str] | None:
        """The linear layers the method attaches to (`all-linear`, suffixes), or None."""
        return getattr(self, "target_modules", None)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config: type[MethodConfig]
    apply: str  # "module:function", imported on first use
    description: str
    paper: str
    mergeable: bool
    exports_plain_lora: bool
    # quant.method values the method trains over (checked on CPU by the method matrix);
    # any other quantization is refused at validate time with `unquantized_because`.
    quantized: frozenset[str] = frozenset()
    unquantized_because: str = "it trains weights of the base, which a quantized base freezes"
    trains_base_weights: bool = False
    # "module:function" that rebuilds the method's native (non-PEFT) adapter directory on a
    # plain model (`peftune.adapters.native.load_native_adapter`); None: a PEFT export
    native_loader: str | None = None

    @property
    def keys(self) -> list[str]:
        """The method's own recipe keys (besides `method`)."""
        return [name for name in self.config.model_fields if name != "method"]

    def load_apply(self) -> Any:
        module, _, func = self.apply.partition(":")
        return getattr(importlib.import_module(module), func)


_METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _METHODS:
        raise ValueError(f"adapter method {spec.name!r} is registered twice")
    _METHODS[spec.name] = spec
    return spec


@contextlib.contextmanager
def registered(spec: MethodSpec) -> Iterator[MethodSpec]:
    """`spec` registered while the block runs (a method defined outside peftune's catalogue,
    e.g. by a test), removed afterwards."""
    register(spec)
    try:
        yield spec
    finally:
        _METHODS.pop(spec.name, None)


BNB_4BIT = frozenset({"nf4", "fp4"})
INT8 = frozenset({"int8"})
INT4 = frozenset({"int4"})
# `unquantized_because` of the inits that move part of W into the adapter (PiSSA, NLoRA...)
RESIDUAL = "its init rewrites the frozen weight as W - B0·A0, which a quantized base cannot hold"


def get_method(name: str) -> MethodSpec:
    return _METHODS[name]


def method_names() -> list[str]:
    return sorted(_METHODS)


def all_methods() -> list[MethodSpec]:
    return [_METHODS[name] for name in sorted(_METHODS)]
