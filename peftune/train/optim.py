"""Optimizers and learning-rate schedules named by `train.optimizer` / `train.scheduler`."""

from __future__ import annotations

from typing import Any

from peftune.errors import InputError
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
    """`lion`: Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms",
    arXiv:2302.06675), the optimizer QFT (Li et al. 2023) trains with; bitsandbytes' 32-bit
    Lion, which runs on CPU and GPU. With g the gradient, m the one moment it keeps per
    parameter and λ the (decoupled) weight decay:

        θ ← θ·(1 - lr·λ) - lr·sign(β1·m + (1-β1)·g);    m ← β2·m + (1-β2)·g

    β = `train.lion_betas` (default 0.9, 0.99). Every coordinate moves by ±lr, so Lion wants
    a 3-10x smaller lr than AdamW, and a 3-10x larger weight decay for the same lr·λ."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW
    import bitsandbytes as bnb

    return {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
            "lion": bnb.optim.Lion}[name]


def build_optimizer(model: Any, cfg: TrainSection) -> Any:
    """`train.optimizer` over the trainable parameters. With `train.loraplus_ratio`, LoRA+
    (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models",
    arXiv:2402.12354) through peft: LoRA's B matrices, and as peft groups them every 1-D
    trained tensor (DoRA magnitudes, biases), learn at ratio x lr; A and LoRA embeddings at
    lr. `train.weight_decay` applies as without LoRA+."""
    if cfg.strategy is not None and cfg.strategy.name == "galore":
        return galore_optimizer(model, cfg)
    if cfg.strategy is not None and cfg.strategy.name == "zo":
        return zeroth_order_optimizer(model, cfg)
    cls = optimizer_class(cfg.optimizer)
    betas = cfg.lion_betas if cfg.optimizer == "lion" else cfg.adam_betas
    kwargs = dict(lr=cfg.lr, betas=tuple(betas))
    if cfg.loraplus_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model=model, optimizer_cls=cls,
                                         loraplus_lr_ratio=cfg.loraplus_ratio,
                                         loraplus_weight_decay=cfg.weight_decay,
                                         loraplus_lr_embedding=cfg.lr, **kwargs)
    return cls(parameter_groups(model, cfg.weight_decay), **kwargs)


def zeroth_order_optimizer(model: Any, cfg: TrainSection) -> Any:
    """`train.strategy: {name: zo}`: MeZO's (or ZO-AdaMU's) forward-only SPSA steps over the
    trainable parameters at `train.lr`, weight decay on matrices only
    (peftune.train.zo.ZerothOrder); the loop gives it the step's loss instead of gradients."""
    from peftune.train.strategies import refuse_sharded_engine
    from peftune.train.zo import ZerothOrder

    zo = cfg.strategy
    refuse_sharded_engine("zo")
    return ZerothOrder(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, eps=zo.eps,
                       n_samples=zo.n_samples, seed=cfg.seed, variant=zo.variant,
                       momentum=zo.momentum, uncertainty=zo.uncertainty)


def galore_optimizer(model: Any, cfg: TrainSection) -> Any:
    """GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection", arXiv:2403.03507) through galore-torch: each 2-D weight of the decoder
    layers keeps its Adam moments for the gradient projected onto rank r, `P^T G` (P from
    the gradient's SVD, recomputed every `update_proj_gap` steps), and is updated by
    `scale * P * adam(P^T G)`; embeddings, head and 1-D tensors get plain AdamW.
    `train.optimizer: adamw8bit` is GaLoreAdamW8bit (bitsandbytes 8-bit moments), CUDA only:
    galore-torch calls torch.cuda.synchronize() in every step."""
    import torch
    from galore_torch import GaLoreAdamW, GaLoreAdamW8bit
    from galore_torch.galore_projector import GaLoreProjector

    from peftune.adapters.common import decoder_layers

    galore = cfg.strategy
    if cfg.optimizer == "adamw8bit" and not torch.cuda.is_available():
        raise InputError("train.optimizer: adamw8bit with strategy galore needs a CUDA GPU "
                         "(galore-torch's GaLoreAdamW8bit synchronises CUDA every step); use "
                         "train.optimizer: adamw on CPU")
    in_layers = {id(p) for block in decoder_layers(model) for p in block.parameters()}
    projected, matrices, vectors = [], [], []
    for param in model.parameters():
        if param.requires_grad:
            group = (projected if param.ndim == 2 and id(param) in in_layers
                     else matrices if param.ndim >= 2 else vectors)
            group.append(param)
    groups = [{"params": projected, "weight_decay": cfg.weight_decay, "rank": galore.rank,
               "update_proj_gap": galore.update_proj_gap, "scale": galore.scale,
               "proj_type": galore.proj_type},
              {"params": matrices, "weight_decay": cfg.weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # the projectors live in the optimizer state: a checkpoint loads them back with weights_only
    torch.serialization.add_safe_globals([GaLoreProjector])
    if cfg.optimizer == "adamw8bit":
        return GaLoreAdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas))
    return GaLoreAdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), no_deprecation_warning=True)


def build_scheduler(optimizer: Any, cfg: TrainSection, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_for(total_steps),
                         num_training_steps=total_steps)
