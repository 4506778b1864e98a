"""Adapter methods: a registry of recipe names (`registry.py`, torch-free configs in
`specs.py`) and one implementation module per method family."""

from __future__ import annotations

from typing import Any

from peftune.adapters.hooks import AdapterHooks
from peftune.adapters.registry import MethodConfig, get_method, method_names

__all__ = ["AdapterHooks", "MethodConfig", "apply_adapter", "get_method", "method_names"]


def apply_adapter(model: Any, config: MethodConfig, **context: Any) -> tuple[Any, AdapterHooks]:
    """Attach the recipe's adapter method to `model`; returns the model and the method's hooks.

    `context` carries what some methods need at init time (the tokenizer, calibration
    batches); a method takes what it uses and ignores the rest.
    """
    apply = get_method(config.method).load_apply()
    return apply(model, config, **context)
