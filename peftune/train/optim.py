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


def optimizer_class(name: str) -> Any:
    import torch

    if name == "adamw":
        return torch.optim.AdamW
    import bitsandbytes as bnb

    return {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW}[name]


def build_optimizer(model: Any, cfg: TrainSection) -> Any:
    """`train.optimizer` over the trainable parameters. With `train.loraplus_ratio`, LoRA+
    (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models",
    arXiv:2402.12354) through peft: LoRA's B matrices, and as peft groups them every 1-D
    trained tensor (DoRA magnitudes, biases), learn at ratio x lr; A and LoRA embeddings at
    lr. `train.weight_decay` applies as without LoRA+."""
    cls = optimizer_class(cfg.optimizer)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas))
    if cfg.loraplus_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model=model, optimizer_cls=cls,
                                         loraplus_lr_ratio=cfg.loraplus_ratio,
                                         loraplus_weight_decay=cfg.weight_decay,
                                         loraplus_lr_embedding=cfg.lr, **kwargs)
    return cls(parameter_groups(model, cfg.weight_decay), **kwargs)


def build_scheduler(optimizer: Any, cfg: TrainSection, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_for(total_steps),
                         num_training_steps=total_steps)
