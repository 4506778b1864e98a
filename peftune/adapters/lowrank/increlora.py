"""IncreLoRA (Zhang et al. 2023, "IncreLoRA: Incremental Parameter Allocation Method for
Parameter-Efficient Fine-tuning", arXiv:2308.12043) on `LowRankLinear`:
ΔW = (alpha/init_r)·Σ_{active i} B_i·A_i, with components added during training to the
modules of highest smoothed sensitivity (formula, schedule and the handling of the
optimizer state: `budget_configs.IncreloraConfig`).

Each module holds its components as separate parameters: the first `init_r` in one pair
(A_0: init_r x in, B_0: out x init_r), then one pair per component it may gain. The
layer's `lora_mask` says which components are active (the rank allocation, saved with the
factors and the importance averages in every checkpoint); an inactive component is
detached in the forward, so it has no gradient and no optimizer state until it is added.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftune.adapters.hooks import AdapterHooks
from peftune.adapters.lowrank.budget_configs import IncreloraConfig
from peftune.adapters.lowrank.export import export_lowrank, load_lowrank_state, lowrank_state
from peftune.adapters.lowrank.inits import kaiming
from peftune.adapters.lowrank.layer import LowRankLinear, lowrank_layers
from peftune.adapters.targets import peft_targets, targeted_layers

_STATE = ("inc_ipt_A", "inc_unc_A", "inc_ipt_B", "inc_unc_B")


def apply_increlora(model: Any, config: IncreloraConfig, *, total_steps: int | None = None,
                    **_: Any) -> tuple[Any, AdapterHooks]:
    """Wrap the targeted linear layers with `capacity` preallocated components each
    (init_r active) and return the model with the importance / growth hook."""
    peft_targets(model, config)  # refuses targets that match nothing or cannot fit max_r
    for param in model.parameters():
        param.requires_grad_(False)
    names = list(targeted_layers(model, config.target_modules))
    capacity = config.capacity(len(names))
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LowRankLinear(getattr(parent, child), rank=capacity, scaling=config.scaling(),
                              dropout=config.dropout)
        _preallocate(layer, config.init_r)
        setattr(parent, child, layer)
    layers = lowrank_layers(model)

    hook_state = {"step": 0}

    def load(m: Any, state: dict) -> None:
        load_lowrank_state(m, state, hook_state)
        for layer in layers.values():
            layer.inc_on = [bool(on) for on in (layer.lora_mask[layer.inc_starts] > 0).tolist()]

    hooks = AdapterHooks(
        export=export_lowrank,
        trainable_state=lambda m: lowrank_state(m, hook_state),
        load_trainable_state=load,
        init_report={"components_at_start": config.init_r * len(layers),
                     "component_budget": config.budget(len(layers)),
                     "preallocated_components": capacity * len(layers)},
    )
    hooks.after_step.append(lambda m, step: hook_state.update(step=step))
    hooks.after_step.append(growth_hook(layers, config, total_steps or 1))
    return model, hooks


def _preallocate(layer: LowRankLinear, init_r: int) -> None:
    """Replace the layer's A, B by component parameters: A_0, B_0 of init_r components,
    then one-component pairs; A uniform ±1/√in (LoRA's), B zero, so adding one is exact."""
    device = layer.lora_mask.device
    sizes = [init_r] + [1] * (layer.rank - init_r)
    layer.inc_A = nn.ParameterList([nn.Parameter(kaiming(k, layer.in_features, device))
                                    for k in sizes])
    layer.inc_B = nn.ParameterList([nn.Parameter(torch.zeros(layer.out_features, k, device=device))
                                    for k in sizes])
    layer.inc_starts = [0] + list(range(init_r, layer.rank))  # first component of each pair
    layer.inc_on = [True] + [False] * (layer.rank - init_r)
    layer.lora_mask[init_r:] = 0.0
    layer.masked = layer.rank > init_r
    for name, shape in (("A", (layer.rank, layer.in_features)),
                        ("B", (layer.out_features, layer.rank))):
        for kind in ("ipt", "unc"):
            layer.register_buffer(f"inc_{kind}_{name}", torch.zeros(shape, device=device))
    layer.state_buffers = _STATE
    layer.make_A = _joined(layer, "inc_A", dim=0)
    layer.make_B = _joined(layer, "inc_B", dim=1)
    layer.factor_params = {"A": list(layer.inc_A), "B": list(layer.inc_B)}
    del layer.lora_A, layer.lora_B
    layer.lora_A = layer.lora_B = None


def _joined(layer: LowRankLinear, attr: str, *, dim: int) -> Callable[[], torch.Tensor]:
    def build() -> torch.Tensor:
        return torch.cat([p if on else p.detach() for p, on in zip(getattr(layer, attr),
                                                                   layer.inc_on, strict=True)],
                         dim=dim)

    return build


def _gradients(params: nn.ParameterList, dim: int) -> torch.Tensor:
    return torch.cat([p.grad.detach().float() if p.grad is not None else torch.zeros_like(p)
                      for p in params], dim=dim)


def update_importance(layer: LowRankLinear, beta1: float, beta2: float) -> None:
    """One EMA step of AdaLoRA's sensitivity I = |w·∂L/∂w| and its uncertainty |I - Ī|
    over every entry (an inactive component has no gradient: I = 0)."""
    with torch.no_grad():
        for name, params, dim in (("A", layer.inc_A, 0), ("B", layer.inc_B, 1)):
            values = torch.cat([p.detach().float() for p in params], dim=dim)
            sensitivity = (values * _gradients(params, dim)).abs()
            ipt, unc = getattr(layer, f"inc_ipt_{name}"), getattr(layer, f"inc_unc_{name}")
            ipt.mul_(beta1).add_((1 - beta1) * sensitivity)
            unc.mul_(beta2).add_((1 - beta2) * (sensitivity - ipt).abs())


def module_score(layer: LowRankLinear) -> float:
    """Mean of Ī·Ū over the entries of the module's active components."""
    active = layer.lora_mask > 0
    a = (layer.inc_ipt_A * layer.inc_unc_A)[active]
    b = (layer.inc_ipt_B * layer.inc_unc_B)[:, active]
    return float((a.sum() + b.sum()) / max(a.numel() + b.numel(), 1))


def add_component(layer: LowRankLinear) -> None:
    """Activate the module's next preallocated component."""
    pair = layer.inc_on.index(False)
    layer.inc_on[pair] = True
    layer.lora_mask[layer.inc_starts[pair]] = 1.0
    layer.masked = bool((layer.lora_mask < 1).any())


def growth_hook(layers: dict[str, LowRankLinear], config: IncreloraConfig,
                total_steps: int) -> Callable[[Any, int], None]:
    """After every optimizer step: update the importance averages; on an addition step,
    give one component to each of the highest-scored modules that still have room."""
    additions = config.addition_steps(total_steps)
    budget = config.budget(len(layers))

    def grow(model: Any, step: int) -> None:
        for layer in layers.values():
            update_importance(layer, config.beta1, config.beta2)
        if step not in additions:
            return
        used = sum(int((layer.lora_mask > 0).sum()) for layer in layers.values())
        remaining = budget - used
        rounds_left = len(additions) - additions.index(step)
        count = config.components_per_add or math.ceil(remaining / rounds_left)
        room = [(module_score(layer), name) for name, layer in layers.items()
                if False in layer.inc_on]
        room.sort(key=lambda item: (-item[0], item[1]))  # ties: by name, deterministically
        for _, name in room[:max(0, min(count, remaining))]:
            add_component(layers[name])

    return grow
