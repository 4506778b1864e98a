"""Optimizers and learning-rate schedules named by `train.optimizer` / `train.scheduler`."""

from __future__ import annotations

from typing import Any

from peftune.recipe.schema import TrainSection


def parameter_groups(model: Any, weight_decay: float) -> list[dict]:
    """Decay matrices; never biases or norm scales (the usual AdamW convention)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: Any, cfg: TrainSection) -> Any:
    import torch

    groups = parameter_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas))
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    import bitsandbytes as bnb

    if cfg.optimizer == "adamw8bit":
        return bnb.optim.AdamW8bit(groups, **kwargs)
    if cfg.optimizer == "paged_adamw":
        return bnb.optim.PagedAdamW(groups, **kwargs)
    raise AssertionError(f"unhandled optimizer {cfg.optimizer}")  # the schema lists the choices


def build_scheduler(optimizer: Any, cfg: TrainSection, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_for(total_steps),
                         num_training_steps=total_steps)
