"""Training strategies for a full fine-tune (`train.strategy` with `adapter.method: full`).

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

The freeze is applied by a forward pre-hook at the next forward, not when the strategy is
built or a checkpoint is loaded: the loop gathers its clipped parameters, and DDP its
reducer, from the parameters that require a gradient when they start, so every parameter
still does then. Under DDP the Accelerator needs `DistributedDataParallelKwargs(
find_unused_parameters=True)` (`strategy_handlers`, passed by peftune.train.setup): frozen
layers take no part in the backward pass, and all ranks agree on which.

GaLore (Zhao et al. 2024) is an optimizer (peftune.train.optim.galore_optimizer), with
nothing to do between steps.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from peftune.adapters.hooks import AdapterHooks
from peftune.errors import InputError
from peftune.recipe.schema import TrainSection

LISA_STATE = "peftune.lisa.state"  # [period, active layer indices...] in a checkpoint


def ddp_kwargs(cfg: TrainSection, adapter: Any = None) -> dict:
    """What the strategy (or the adapter method) needs of `DistributedDataParallelKwargs`
    under several processes: LISA, and methods whose trainable parameters may take no part
    in a step (`ddp_unused_parameters`, e.g. IncreLoRA's not-yet-active components), need
    DDP to find the unused ones."""
    lisa = cfg.strategy is not None and cfg.strategy.name == "lisa"
    unused = lisa or getattr(adapter, "ddp_unused_parameters", False)
    return {"find_unused_parameters": True} if unused else {}


def strategy_handlers(cfg: TrainSection, adapter: Any = None) -> list:
    """Accelerate's `kwargs_handlers` for the strategy and method (see `ddp_kwargs`)."""
    from accelerate.utils import DistributedDataParallelKwargs

    kwargs = ddp_kwargs(cfg, adapter)
    return [DistributedDataParallelKwargs(**kwargs)] if kwargs else []


def apply_strategy(cfg: TrainSection, *, model: Any, optimizer: Any, hooks: AdapterHooks
                   ) -> AdapterHooks:
    """The method's hooks with the strategy's added (`model` unwrapped, `optimizer` built)."""
    if cfg.strategy is None or cfg.strategy.name != "lisa":
        return hooks
    lisa = LisaSampler(model, optimizer, layers=cfg.strategy.layers,
                       interval=cfg.strategy.interval, seed=cfg.seed)
    return replace(hooks, after_step=[*hooks.after_step, lisa.after_step],
                   trainable_state=lisa.trainable_state,
                   load_trainable_state=lisa.load_trainable_state)


class LisaSampler:
    """LISA's layer sampling over `model`'s decoder layers (see the module docstring)."""

    def __init__(self, model: Any, optimizer: Any, *, layers: int, interval: int, seed: int):
        from peftune.adapters.common import decoder_layers

        self.blocks = decoder_layers(model)
        if layers > len(self.blocks):
            raise InputError(f"train.strategy.layers: {layers} active layers is more than the "
                             f"model's {len(self.blocks)} decoder layers; use at most "
                             f"{len(self.blocks)}")
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
        self.layers, self.interval, self.seed = layers, interval, seed
        self.period = 0
        self.active = self.draw(0)
        self.applied = False
        model.register_forward_pre_hook(self._before_forward)

    def draw(self, period: int) -> list[int]:
        import numpy as np

        rng = np.random.default_rng([self.seed, period])
        return sorted(int(i) for i in rng.choice(len(self.blocks), self.layers, replace=False))

    def after_step(self, model: Any, step: int) -> None:
        if step % self.interval == 0:
            self.period = step // self.interval
            self.active = self.draw(self.period)
            self.apply()

    def apply(self) -> None:
        """Train the active layers, freeze the rest and drop their gradients and Adam state."""
        active = set(self.active)
        for index, block in enumerate(self.blocks):
            for param in block.parameters():
                param.requires_grad_(index in active)
                if index not in active:
                    param.grad = None
                    self.optimizer.state.pop(param, None)
        self.applied = True

    def _before_forward(self, module: Any, args: Any) -> None:
        if not self.applied:
            self.apply()

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
