"""Adapter methods, one folder per family, on shared infrastructure.

  registry      recipe name -> config schema + lazily imported implementation
  specs         imports every family's configs once: the registration of the built-ins
  hooks         what a method hands the training loop (`AdapterHooks`)
  common        trainable state, export, parameter counts, decoder layers
  targets       `target_modules` matching and checks; `TargetedConfig`
  calibration   `adapter.calibration` and the calibration passes of data-driven inits

  lora/         peft's LoRA and its variants and inits
  tuners/       peft's other weight-space tuners
  prompt/       virtual-token methods (prompt, prefix, P-tuning)
  bottleneck/   bottleneck adapters and Compacter (native)
  full/         full fine-tuning and freeze (train the base's own weights)
  lowrank/      native low-rank methods on one generalised layer

Importing this package registers every method (torch-free); docs/adding_a_method.md says
how to add one.
"""

from __future__ import annotations

from typing import Any

from peftune.adapters import specs  # noqa: F401  (registers the built-in methods)
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
