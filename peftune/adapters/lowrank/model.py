"""Applying a native low-rank method: wrap the targeted linear layers in `LowRankLinear`,
set the factors by the config's `init_rule` (`inits.py`), choose what trains (its
`trainable`), and hand the loop the config's `training_hooks` (`training_hooks.py`: an extra
loss or an after-step operation). Papers and formulas: `configs.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from peftune.adapters.hooks import AdapterHooks
from peftune.adapters.lowrank import inits, training_hooks
from peftune.adapters.lowrank.configs import LowRankConfig
from peftune.adapters.lowrank.export import export_lowrank, load_lowrank_state, lowrank_state
from peftune.adapters.lowrank.layer import LowRankLinear, lowrank_layers
from peftune.adapters.targets import peft_targets, targeted_layers
from peftune.errors import InputError


def apply_lowrank(model: Any, config: LowRankConfig, *, total_steps: int | None = None,
                  learning_rate: float | None = None, seed: int = 0,
                  calibration_batches: Callable[[Any], list[dict]] | None = None,
                  **_: Any) -> tuple[Any, AdapterHooks]:
    """Wrap the targeted linear layers, initialise them by the method's rule, and return
    the model with the method's hooks."""
    peft_targets(model, config)  # refuses targets that match nothing or cannot fit the rank
    for param in model.parameters():
        param.requires_grad_(False)
    layers = _wrap(model, config)
    context = {"seed": seed, "model": model}
    if config.calibrated:
        if calibration_batches is None:
            raise InputError(f"adapter.method {config.method} needs calibration data "
                             "(adapter.calibration)")
        context["batches"] = calibration_batches(config.calibration)
    report = getattr(inits, config.init_rule)(layers, config, context) or {}
    for layer in layers.values():
        if config.residual:
            layer.move_into_factors()
        _set_trainable(layer, config.trainable)

    hook_state = {"step": 0}
    hooks = AdapterHooks(
        export=export_lowrank,
        trainable_state=lambda m: lowrank_state(m, hook_state),
        load_trainable_state=lambda m, state: load_lowrank_state(m, state, hook_state),
        init_report=report,
    )
    hooks.after_step.append(lambda m, step: hook_state.update(step=step))
    for name in config.training_hooks:
        getattr(training_hooks, name)(hooks, layers, config, total_steps=total_steps or 1,
                                      learning_rate=learning_rate or 0.0, seed=seed,
                                      hook_state=hook_state)
    return model, hooks


def _wrap(model: nn.Module, config: LowRankConfig) -> dict[str, LowRankLinear]:
    for name in targeted_layers(model, config.target_modules):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LowRankLinear(getattr(parent, child), rank=config.r, scaling=config.scaling(),
                              dropout=config.dropout, core=config.core,
                              sequential=config.sequential)
        setattr(parent, child, layer)
    return lowrank_layers(model)


def _factors(layer: LowRankLinear, name: str) -> list[nn.Parameter]:
    """The parameters behind factor `name` (NOLA's coefficients stand for A and B; a
    layer whose factors are generated from other parameters lists them in
    `factor_params`: MoS's shards, LoRA-SP's free entries, IncreLoRA's components)."""
    listed = getattr(layer, "factor_params", None)
    if listed is not None and name in listed:
        return listed[name]
    nola_a, nola_b = getattr(layer, "nola_alpha", None), getattr(layer, "nola_beta", None)
    return {
        "A": [nola_a if nola_a is not None else layer.lora_A],
        "B": [nola_b if nola_b is not None else layer.lora_B],
        "M": [layer.lora_M], "scalar": [layer.lora_scalar],
        "seq": [layer.seq_A, layer.seq_B] if layer.sequential else [],
    }[name]


def _set_trainable(layer: LowRankLinear, trainable: tuple[str, ...]) -> None:
    for name in ("A", "B", "M", "scalar", "seq"):
        for param in _factors(layer, name):
            if param is not None:
                param.requires_grad_(name in trainable)
