"""Applying a sparse method: choose each targeted weight's first index set by the config's
`selection` (`selection.py`), wrap the layers in `SparseDeltaLinear` (DSEE: around a
LoRA path, `LowRankLinear`), train only the deltas (and LT-SFT's dense phase, DSEE's
factors), and hand the loop the method's hooks (`training_hooks.py`) and its export
(`export.py`). Papers and formulas: `configs.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from peftune.adapters.hooks import AdapterHooks
from peftune.adapters.sparse import selection, training_hooks
from peftune.adapters.sparse.configs import DseeConfig, LtSftConfig, SparseConfig, SpielConfig
from peftune.adapters.sparse.export import export_sparse, load_sparse_state, sparse_state
from peftune.adapters.sparse.layer import SparseDeltaLinear, sparse_layers
from peftune.adapters.targets import peft_targets, targeted_layers
from peftune.errors import InputError

# after-step operations of the methods that change their index set while training
HOOKS = {LtSftConfig: training_hooks.switch_after_dense_phase,
         SpielConfig: training_hooks.regrow_every_interval}


def apply_sparse(model: Any, config: SparseConfig, *, total_steps: int | None = None,
                 seed: int = 0, calibration_batches: Callable[[Any], list[dict]] | None = None,
                 **_: Any) -> tuple[Any, AdapterHooks]:
    """Choose the entries, wrap the targeted linear layers, and return the model with the
    method's hooks."""
    peft_targets(model, config)  # refuses targets that match nothing or cannot fit
    problem = getattr(config, "run_problem", None)
    if problem is not None and total_steps and problem(total_steps):
        raise InputError(problem(total_steps))
    for param in model.parameters():
        param.requires_grad_(False)
    names = {name: dims for name, dims in targeted_layers(model, config.target_modules).items()}
    context: dict = {"seed": seed}
    if config.calibrated:
        if calibration_batches is None:
            raise InputError(f"adapter.method {config.method} needs calibration data "
                             "(adapter.calibration)")
        context["batches"] = calibration_batches(config.calibration)
    chosen, report = getattr(selection, config.selection)(model, names, config, **context)
    layers = _wrap(model, chosen, config)

    hook_state = {"step": 0}
    hooks = AdapterHooks(
        export=partial(export_sparse, config=config),
        trainable_state=lambda m: sparse_state(m, hook_state),
        load_trainable_state=lambda m, state: load_sparse_state(m, state, hook_state),
        init_report={**report, "sparse_entries": sum(layer.sparse_values.numel()
                                                     for layer in layers.values())},
    )
    hooks.after_step.append(lambda m, step: hook_state.update(step=step))
    hook = HOOKS.get(type(config))
    if hook is not None:
        hook(hooks, layers, config, total_steps=total_steps or 1, hook_state=hook_state)
    return model, hooks


def _wrap(model: nn.Module, chosen: dict, config: SparseConfig) -> dict[str, SparseDeltaLinear]:
    for name, picked in chosen.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if isinstance(config, DseeConfig):
            base = _low_rank_path(base, config)
        layer = SparseDeltaLinear(base, picked["indices"], columns=picked.get("columns"))
        if isinstance(config, LtSftConfig):
            training_hooks.start_dense_phase(layer)
        setattr(parent, child, layer)
    return sparse_layers(model)


def _low_rank_path(base: nn.Module, config: DseeConfig) -> nn.Module:
    """DSEE's (alpha/r)·B·A beside the weight, LoRA's init (A Kaiming, B zero), trained."""
    from peftune.adapters.lowrank.inits import lora_init
    from peftune.adapters.lowrank.layer import LowRankLinear

    layer = LowRankLinear(base, rank=config.r, scaling=config.scaling(), dropout=config.dropout)
    lora_init({"": layer}, config, {})
    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(True)
    return layer
