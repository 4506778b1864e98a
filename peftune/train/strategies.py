"""Training strategies (`train.strategy`): LISA and GaLore for a full fine-tune, IST for
adapter methods, zeroth-order (zo) for either. This module builds the one a recipe names.

LISA (Pan et al. 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient Large
Language Model Fine-Tuning", arXiv:2403.17919): every parameter outside the decoder layers
(embeddings, final norm, head) always trains; of the L decoder layers only γ =
`train.strategy.layers`, drawn uniformly without replacement, train during each period of
K = `train.strategy.interval` optimizer steps; the others are frozen (requires_grad False,
gradient None) and their optimizer state is deleted, so Adam holds moments for γ layers
instead of L. A layer drawn again starts from fresh moments, as in the paper's reference.

The draw of period k is `numpy.random.default_rng([train.seed, k])`: every process of a DDP
run draws the same layers with no communication, and a resumed run draws what the first one
would have. The checkpoint also holds the current period and layers (`peftune.lisa.state`).

The freeze is applied by a forward pre-hook at the next forward (peftune.train.layer_sampling,
shared with IST). Under DDP the Accelerator needs `DistributedDataParallelKwargs(
find_unused_parameters=True)` (`strategy_handlers`, passed by peftune.train.setup): frozen
layers take no part in the backward pass, and all ranks agree on which.

GaLore (Zhao et al. 2024) and zo (MeZO / ZO-AdaMU) are optimizers (peftune.train.optim,
peftune.train.zo), with nothing to do between steps; IST (Yao et al. 2024) samples the PEFT
modules of layers by importance (peftune.train.ist).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from peftune.adapters.hooks import AdapterHooks
from peftune.errors import InputError
from peftune.recipe.schema import TrainSection
from peftune.train.layer_sampling import LayerSampler

LISA_STATE = "peftune.lisa.state"  # [period, active layer indices...] in a checkpoint
LAYER_STRATEGIES = ("lisa", "ist")  # they freeze layers: DDP must find unused parameters


def ddp_kwargs(cfg: TrainSection, adapter: Any = None) -> dict:
    """What the strategy (or the adapter method) needs of `DistributedDataParallelKwargs`
    under several processes: LISA and IST, and methods whose trainable parameters may take
    no part in a step (`ddp_unused_parameters`, e.g. IncreLoRA's not-yet-active components),
    need DDP to find the unused ones."""
    sampled = cfg.strategy is not None and cfg.strategy.name in LAYER_STRATEGIES
    unused = sampled or getattr(adapter, "ddp_unused_parameters", False)
    return {"find_unused_parameters": True} if unused else {}


def strategy_handlers(cfg: TrainSection, adapter: Any = None) -> list:
    """Accelerate's `kwargs_handlers` for the strategy and method (see `ddp_kwargs`)."""
    from accelerate.utils import DistributedDataParallelKwargs

    kwargs = ddp_kwargs(cfg, adapter)
    return [DistributedDataParallelKwargs(**kwargs)] if kwargs else []


def refuse_sharded_engine(name: str) -> None:
    """zo and ist change which parameters train, or perturb them, in place on every process;
    under FSDP or DeepSpeed each process holds only a shard (refused, one line)."""
    import os

    for variable, engine in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED",
                                                                "DeepSpeed")):
        if os.environ.get(variable, "false").lower() == "true":
            raise InputError(f"train.strategy: strategy {name} does not run under {engine} "
                             "(each process holds a shard of the parameters); launch with DDP "
                             "(--nproc N) or on one process")


def apply_strategy(cfg: TrainSection, *, model: Any, optimizer: Any, hooks: AdapterHooks
                   ) -> AdapterHooks:
    """The method's hooks with the strategy's added (`model` unwrapped, `optimizer` built).
    zo needs none: it is an optimizer (peftune.train.zo, built by build_optimizer)."""
    name = cfg.strategy.name if cfg.strategy is not None else None
    if name == "lisa":
        lisa = LisaSampler(model, optimizer, layers=cfg.strategy.layers,
                           interval=cfg.strategy.interval, seed=cfg.seed)
        return replace(hooks, after_step=[*hooks.after_step, lisa.after_step],
                       trainable_state=lisa.trainable_state,
                       load_trainable_state=lisa.load_trainable_state)
    if name == "ist":
        from peftune.train.ist import IstSampler

        refuse_sharded_engine(name)
        return IstSampler.from_config(model, cfg.strategy, seed=cfg.seed).hooks(hooks)
    return hooks


class LisaSampler(LayerSampler):
    """LISA's layer sampling over `model`'s decoder layers (see the module docstring)."""

    def __init__(self, model: Any, optimizer: Any, *, layers: int, interval: int, seed: int):
        super().__init__(model, layers=layers, seed=seed,
                         params_of=lambda block: block.parameters())
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
        self.interval = interval
        self.period = 0
        self.active = self.draw(0)

    def draw(self, period: int) -> list[int]:
        import numpy as np

        rng = np.random.default_rng([self.seed, period])
        return sorted(int(i) for i in rng.choice(len(self.blocks), self.layers, replace=False))

    def after_step(self, model: Any, step: int) -> None:
        if step % self.interval == 0:
            self.period = step // self.interval
            self.active = self.draw(self.period)
            self.apply()

    def release(self, param: Any) -> None:
        self.optimizer.state.pop(param, None)  # Adam moments for the active layers only

    def trainable_state(self, model: Any) -> dict:
        """Every parameter (frozen layers were trained in earlier periods) and the draw."""
        import torch

        state = {name: param.detach().to("cpu", copy=True).contiguous()
                 for name, param in model.named_parameters()}
        state[LISA_STATE] = torch.tensor([self.period, *self.active], dtype=torch.int64)
        return state

    def load_trainable_state(self, model: Any, state: dict) -> None:
        import torch

        state = dict(state)
        saved = state.pop(LISA_STATE, None)
        params = dict(model.named_parameters())
        if saved is None or set(params) != set(state):
            raise ValueError("checkpoint does not match the model: it was not written by a "
                             "LISA run of this model")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])
        self.period, self.active = int(saved[0]), [int(i) for i in saved[1:]]
        self.applied = False  # frozen again at the next forward


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (Adam moments, 8-bit
    quantisation maps, GaLore's projection matrices)."""
    import torch

    def size(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, (list, tuple)):
            return sum(size(v) for v in value)
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        if hasattr(value, "ortho_matrix"):  # galore-torch's GaLoreProjector
            return size(value.ortho_matrix)
        return 0

    optimizer = getattr(optimizer, "optimizer", optimizer)
    return sum(size(state) for state in optimizer.state.values())
