"""The native low-rank methods on `LowRankLinear`: each is an init rule, a choice of
trained factors (its config's `trainable`) and, where its paper needs one, a hook the loop
calls (an extra loss or an after-step operation). Papers and formulas: `configs.py`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftune.adapters.hooks import AdapterHooks
from peftune.adapters.lowrank.configs import (
    DyloraConfig,
    DyrankConfig,
    LamdaConfig,
    LowRankConfig,
    S2loraConfig,
    SoraConfig,
    SorsaConfig,
)
from peftune.adapters.lowrank.export import export_lowrank, load_lowrank_state, lowrank_state
from peftune.adapters.lowrank.inits import INITS
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
    report = INITS[config.method](layers, config, context) or {}
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
    for extra in _METHOD_HOOKS.get(type(config), ()):
        extra(hooks, layers, config, total_steps=total_steps or 1,
              learning_rate=learning_rate or 0.0, seed=seed, hook_state=hook_state)
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


# ---- hooks ---------------------------------------------------------------------------------

def _sora_hooks(hooks: AdapterHooks, layers: dict, config: SoraConfig, *, learning_rate: float,
                **_: Any) -> None:
    """After each optimizer step, the proximal operator of lr·sparsity·‖g‖₁ on every gate."""
    threshold = learning_rate * config.sparsity

    def soft_threshold(model: Any, step: int) -> None:
        with torch.no_grad():
            for layer in layers.values():
                gate = layer.lora_M
                gate.copy_(gate.sign() * (gate.abs() - threshold).clamp_min(0))

    hooks.after_step.append(soft_threshold)


def _dylora_hooks(hooks: AdapterHooks, layers: dict, config: DyloraConfig, *, seed: int,
                  **_: Any) -> None:
    """Each step trains at a rank b in [min_rank, r], drawn from (seed, step) alone so that
    a resumed run draws the same ranks; evaluation and export use `export_rank`."""

    def draw(step: int) -> None:
        rank = random.Random(seed * 1_000_003 + step).randint(config.min_rank, config.r)
        for layer in layers.values():
            layer.rank_limit = rank

    for layer in layers.values():
        layer.eval_rank = config.export_rank or config.r
    draw(0)
    hooks.after_step.append(lambda model, step: draw(step))


def _dyrank_hooks(hooks: AdapterHooks, layers: dict, config: DyrankConfig, *,
                  total_steps: int, hook_state: dict, **_: Any) -> None:
    """EMA importance of every component, global pruning on a cubic budget schedule, and
    the variance regulariser until pruning ends."""
    start = int(config.prune_start * total_steps)
    end = max(start + 1, int(config.prune_end * total_steps))
    initial, target = config.r * len(layers), config.target_r * len(layers)
    for layer in layers.values():
        layer.register_buffer("importance", torch.zeros(layer.rank, device=layer.lora_mask.device))

    def prune(model: Any, step: int) -> None:
        with torch.no_grad():
            for layer in layers.values():
                a, b, c = layer.lora_A, layer.lora_B, layer.lora_M * layer.lora_mask
                parts = c.abs() * b.norm(dim=0) * a.norm(dim=1)  # ‖c_i·B_i·A_iᵀ‖_F
                # ‖B·diag(c)·A‖_F² = tr((BᵀB)·C·(AAᵀ)·C), from two r x r products
                total = torch.sqrt(torch.clamp(((b.T @ b) * torch.outer(c, c) * (a @ a.T)).sum(),
                                               min=1e-24))
                layer.importance.mul_(config.beta).add_((1 - config.beta) * parts / total)
            if step < start:
                return
            progress = min(1.0, (step - start) / (end - start))
            budget = int(round(target + (initial - target) * (1 - progress) ** 3))
            scores = torch.cat([torch.where(layer.lora_mask > 0, layer.importance,
                                            torch.full_like(layer.importance, -1.0))
                                for layer in layers.values()])
            if budget >= int((scores >= 0).sum()):
                return
            threshold = scores.topk(budget).values.min() if budget > 0 else float("inf")
            for layer in layers.values():
                drop = (layer.importance < threshold) & (layer.lora_mask > 0)
                if drop.any():
                    layer.lora_mask[drop] = 0.0
                    layer.masked = True

    def variance(model: Any) -> Any:
        if hook_state["step"] >= end or config.regularizer == 0:
            return None
        terms = [layer.lora_A.var(dim=1).sum() + layer.lora_B.var(dim=0).sum()
                 for layer in layers.values()]
        return config.regularizer * torch.stack(terms).mean()

    hooks.after_step.append(prune)
    hooks.extra_loss = variance


def _lamda_hooks(hooks: AdapterHooks, layers: dict, config: LamdaConfig, *, total_steps: int,
                 **_: Any) -> None:
    """B trains for the first `train_b_for` of the run, then is frozen (no more updates)."""
    freeze_at = math.ceil(config.train_b_for * total_steps)

    def freeze(model: Any, step: int) -> None:
        if step >= freeze_at:
            for layer in layers.values():
                layer.lora_B.requires_grad_(False)
                layer.lora_B.grad = None

    hooks.after_step.append(freeze)
    if freeze_at == 0:
        freeze(None, 0)


def _sorsa_hooks(hooks: AdapterHooks, layers: dict, config: SorsaConfig, **_: Any) -> None:
    """γ·Σ_layers ‖UᵀU - I‖_F + ‖VᵀV - I‖_F over the trained singular vectors."""

    def orthonormal(model: Any) -> Any:
        terms = []
        for layer in layers.values():
            eye = torch.eye(layer.rank, device=layer.lora_A.device)
            terms.append(torch.linalg.matrix_norm(layer.lora_B.T @ layer.lora_B - eye)
                         + torch.linalg.matrix_norm(layer.lora_A @ layer.lora_A.T - eye))
        return config.regularizer * torch.stack(terms).sum()

    if config.regularizer > 0:
        hooks.extra_loss = orthonormal


def _s2lora_hooks(hooks: AdapterHooks, layers: dict, config: S2loraConfig, **_: Any) -> None:
    """L1 penalty on every module's rank coefficients."""

    def l1(model: Any) -> Any:
        return config.sparsity * torch.stack([layer.lora_M.abs().sum()
                                              for layer in layers.values()]).sum()

    if config.sparsity > 0:
        hooks.extra_loss = l1


_METHOD_HOOKS = {
    SoraConfig: (_sora_hooks,), DyloraConfig: (_dylora_hooks,), DyrankConfig: (_dyrank_hooks,),
    LamdaConfig: (_lamda_hooks,), SorsaConfig: (_sorsa_hooks,), S2loraConfig: (_s2lora_hooks,),
}
