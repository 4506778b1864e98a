"""What the native low-rank methods hand the training loop, by name: a config lists the
ones its paper needs in `training_hooks`, and `apply_lowrank` calls each as
`hook(hooks, layers, config, total_steps=, learning_rate=, seed=, hook_state=)`, which adds
to `hooks` an after-step operation (`hooks.after_step`) or an extra loss (`hooks.extra_loss`).
Papers and formulas: `configs.py`.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from peftune.adapters.hooks import AdapterHooks
from peftune.adapters.lowrank.budget_configs import AfloraConfig
from peftune.adapters.lowrank.configs import (
    DyloraConfig,
    DyrankConfig,
    LamdaConfig,
    S2loraConfig,
    SoraConfig,
    SorsaConfig,
)
from peftune.adapters.lowrank.layer import LowRankLinear

Layers = dict[str, LowRankLinear]


def soft_threshold_gates(hooks: AdapterHooks, layers: Layers, config: SoraConfig, *,
                         learning_rate: float, **_: Any) -> None:
    """After each optimizer step, the proximal operator of lr·sparsity·‖g‖₁ on every gate."""
    threshold = learning_rate * config.sparsity

    def soft_threshold(model: Any, step: int) -> None:
        with torch.no_grad():
            for layer in layers.values():
                gate = layer.lora_M
                gate.copy_(gate.sign() * (gate.abs() - threshold).clamp_min(0))

    hooks.after_step.append(soft_threshold)


def sample_rank(hooks: AdapterHooks, layers: Layers, config: DyloraConfig, *, seed: int,
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


def prune_components(hooks: AdapterHooks, layers: Layers, config: DyrankConfig, *,
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


def freeze_b_late(hooks: AdapterHooks, layers: Layers, config: LamdaConfig, *,
                  total_steps: int, **_: Any) -> None:
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


def freeze_projections(hooks: AdapterHooks, layers: Layers, config: AfloraConfig, *,
                       total_steps: int, **_: Any) -> None:
    """AFLoRA: after each step update every trainable projection's smoothed sensitivity and
    uncertainty from its gradient, then freeze the lowest-scoring ones until the cubic
    schedule's fraction of all projections is frozen. The scores are all-reduced gradients'
    (the same on every DDP rank), so every rank freezes the same projections."""
    start = math.floor(config.warmup * total_steps)
    end = max(math.ceil((1 - config.final) * total_steps), start + 1)
    projections = [(layer, name) for layer in layers.values() for name in ("A", "B")]

    def factor(layer: LowRankLinear, name: str) -> torch.nn.Parameter:
        return layer.lora_A if name == "A" else layer.lora_B

    def frozen_fraction(step: int) -> float:
        if step <= start:
            return 0.0
        return 1.0 - (1.0 - min((step - start) / (end - start), 1.0)) ** 3

    def update(model: Any, step: int) -> None:
        with torch.no_grad():
            for layer, name in projections:
                param = factor(layer, name)
                if not param.requires_grad or param.grad is None:
                    continue
                sensitivity = (param * param.grad).abs()
                average = getattr(layer, f"aflora_ipt_{name}")
                average.mul_(config.beta1).add_(sensitivity, alpha=1 - config.beta1)
                getattr(layer, f"aflora_unc_{name}").mul_(config.beta2).add_(
                    (sensitivity - average).abs(), alpha=1 - config.beta2)
        live = [(layer, name) for layer, name in projections if factor(layer, name).requires_grad]
        due = round(frozen_fraction(step) * len(projections)) - (len(projections) - len(live))
        if due <= 0:
            return
        scores = torch.stack([(getattr(layer, f"aflora_ipt_{name}")
                               * getattr(layer, f"aflora_unc_{name}")).mean()
                              for layer, name in live]).cpu()
        for index in sorted(range(len(live)), key=lambda i: (scores[i].item(), i))[:due]:
            param = factor(*live[index])
            param.requires_grad_(False)
            param.grad = None

    hooks.after_step.append(update)


def orthonormal_penalty(hooks: AdapterHooks, layers: Layers, config: SorsaConfig,
                        **_: Any) -> None:
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


def l1_on_coefficients(hooks: AdapterHooks, layers: Layers, config: S2loraConfig,
                       **_: Any) -> None:
    """L1 penalty on every module's rank coefficients."""

    def l1(model: Any) -> Any:
        return config.sparsity * torch.stack([layer.lora_M.abs().sum()
                                              for layer in layers.values()]).sum()

    if config.sparsity > 0:
        hooks.extra_loss = l1
