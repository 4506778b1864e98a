"""What the layer-sampling strategies share (LISA in peftune.train.strategies, IST in
peftune.train.ist): the model's decoder layers, each with the parameters a draw trains or
freezes, and the freeze itself.

A frozen parameter has requires_grad off and no gradient, so the backward pass neither
computes nor stores anything for it. The freeze is applied at the next forward (a forward
pre-hook) or by the strategy before a step, never when the strategy is built or a checkpoint
is loaded: the loop gathers its clipped parameters, and DDP its reducer, from the parameters
that require a gradient when they start, so every parameter still does then. Under DDP the
Accelerator needs `find_unused_parameters=True` (peftune.train.strategies.ddp_kwargs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from peftune.errors import InputError


class LayerSampler:
    """`layers` of the model's decoder layers train at a time (`active`), the others' parameters
    (`params_of(block)` of each) are frozen. Subclasses draw `active` and call `apply`."""

    def __init__(self, model: Any, *, layers: int, seed: int,
                 params_of: Callable[[Any], list]) -> None:
        from peftune.adapters.common import decoder_layers

        self.blocks = decoder_layers(model)
        if layers > len(self.blocks):
            raise InputError(f"train.strategy.layers: {layers} active layers is more than the "
                             f"model's {len(self.blocks)} decoder layers; use at most "
                             f"{len(self.blocks)}")
        self.layer_params = [list(params_of(block)) for block in self.blocks]
        self.layers, self.seed = layers, seed
        self.active: list[int] = []
        self.applied = False
        model.register_forward_pre_hook(self._before_forward)

    def apply(self) -> None:
        """Train the active layers' parameters, freeze the rest and drop their gradients."""
        active = set(self.active)
        for index, params in enumerate(self.layer_params):
            for param in params:
                param.requires_grad_(index in active)
                if index not in active:
                    param.grad = None
                    self.release(param)
        self.applied = True

    def release(self, param: Any) -> None:
        """What else a parameter gives up when it is frozen (LISA: its Adam state)."""

    @contextlib.contextmanager
    def all_trainable(self) -> Iterator[None]:
        """Every sampled parameter requires a gradient while the block runs (a method's
        checkpoint and export select its tensors by requires_grad), then the freeze is back."""
        frozen = [p for params in self.layer_params for p in params if not p.requires_grad]
        for param in frozen:
            param.requires_grad_(True)
        try:
            yield
        finally:
            for param in frozen:
                param.requires_grad_(False)

    def _before_forward(self, module: Any, args: Any) -> None:
        if not self.applied:
            self.apply()
