"""What the sparse methods hand the training loop while it runs: LT-SFT's switch from its
dense phase to the sparse one, and SpIEL's prune-and-regrow. Both change what the optimizer
holds (LT-SFT frees the dense phase's moments, SpIEL moves moments with the indices), so
they reach the optimizer through `BoundOptimizer`. Papers and formulas: `configs.py`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from peftune.adapters.hooks import AdapterHooks
from peftune.adapters.sparse.configs import LtSftConfig, SpielConfig
from peftune.adapters.sparse.layer import SparseDeltaLinear
from peftune.adapters.sparse.selection import generator, sample_entries

Layers = dict[str, SparseDeltaLinear]


class BoundOptimizer:
    """The run's optimizer, handed to the method once built (`AdapterHooks.bind_optimizer`);
    None where the model is used outside a training run."""

    def __init__(self, hooks: AdapterHooks):
        self.optimizer: Any = None
        hooks.bind_optimizer.append(self.bind)

    def bind(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def state(self, param: torch.Tensor) -> dict:
        """The optimizer's state of `param` (empty before its first step)."""
        return {} if self.optimizer is None else self.optimizer.state.get(param, {})

    def forget(self, param: torch.Tensor) -> None:
        if self.optimizer is not None:
            self.optimizer.state.pop(param, None)


# ---- LT-SFT ----------------------------------------------------------------------------------

def start_dense_phase(layer: SparseDeltaLinear) -> None:
    """A dense trained D beside the frozen W (zero: the model starts as the base)."""
    layer.dense_delta = torch.nn.Parameter(torch.zeros(layer.shape, device=layer.sparse_values.device))
    layer.sparse_active = False


def end_dense_phase(layer: SparseDeltaLinear, config: LtSftConfig) -> None:
    """Keep the k entries of D largest in magnitude as the index set, every entry back at
    its pretrained value (δ = 0), and free D."""
    with torch.no_grad():
        moved = layer.dense_delta.detach().abs().reshape(-1)
        k = config.entries(layer.in_features, layer.out_features)
        kept = torch.topk(moved, k, sorted=False).indices.sort().values
    layer.set_indices(kept)
    free_dense(layer)


def free_dense(layer: SparseDeltaLinear) -> None:
    dense = layer.dense_delta
    dense.requires_grad_(False)
    dense.grad = None
    dense.data = torch.empty(0, device=dense.device)
    layer.sparse_active = True


def switch_after_dense_phase(hooks: AdapterHooks, layers: Layers, config: LtSftConfig,
                             **_: Any) -> None:
    """After step `full_steps`: every layer keeps its most-changed entries (sparse phase)."""
    optimizer = BoundOptimizer(hooks)

    def switch(model: Any, step: int) -> None:
        if step != config.full_steps:
            return
        for layer in layers.values():
            if not layer.sparse_active:
                optimizer.forget(layer.dense_delta)
                end_dense_phase(layer, config)

    hooks.after_step.append(switch)


# ---- SpIEL -----------------------------------------------------------------------------------

def probe_count(layer: SparseDeltaLinear, config: SpielConfig) -> int:
    return math.ceil(config.candidates * config.regrow_count(layer.sparse_values.numel()))


def draw_probes(layer: SparseDeltaLinear, name: str, config: SpielConfig, draw: int) -> None:
    """A fresh candidate set outside the active entries, and its gradient sum at zero."""
    probes = sample_entries(layer.numel, probe_count(layer, config),
                            generator(config.seed, name, draw), exclude=layer.sparse_indices)
    layer.set_probes(probes)
    layer.register_buffer("probe_grad_sum", torch.zeros(probes.numel(),
                                                        device=layer.sparse_values.device))


def accumulate_probe_gradients(layer: SparseDeltaLinear) -> None:
    if layer.probe_values is not None and layer.probe_values.grad is not None:
        layer.probe_grad_sum += layer.probe_values.grad
        layer.probe_values.grad = None


def prune_and_regrow(layer: SparseDeltaLinear, config: SpielConfig, state: dict) -> int:
    """Drop the active entries with the smallest |δ|, regrow as many candidates with the
    largest |accumulated gradient| (δ = 0), keep the indices sorted, and move the optimizer
    state of `sparse_values` the same way (regrown entries' moments at zero). Returns the
    number of entries replaced."""
    if layer.probe_indices is None:
        return 0
    count = min(config.regrow_count(layer.sparse_values.numel()), layer.probe_indices.numel())
    if count == 0:
        return 0
    with torch.no_grad():
        values = layer.sparse_values.detach()
        kept = torch.argsort(values.abs(), stable=True)[count:].sort().values
        grown = torch.argsort(-layer.probe_grad_sum.abs(), stable=True)[:count]
        indices, order = torch.sort(torch.cat([layer.sparse_indices[kept],
                                               layer.probe_indices[grown]]))

        def moved(tensor: torch.Tensor) -> torch.Tensor:
            return torch.cat([tensor[kept], torch.zeros_like(tensor[:count])])[order]

        for value in state.values():  # Adam's moments (any per-entry float state)
            if torch.is_tensor(value) and value.is_floating_point() and \
                    value.shape == values.shape:
                value.copy_(moved(value))
        layer.set_indices(indices, moved(values))
    return count


def regrow_every_interval(hooks: AdapterHooks, layers: Layers, config: SpielConfig, *,
                          total_steps: int, **_: Any) -> None:
    """Collect the candidates' gradients every step; every `update_interval` steps (before
    the last one) prune and regrow each layer, then draw new candidates."""
    optimizer = BoundOptimizer(hooks)
    for name, layer in layers.items():
        draw_probes(layer, name, config, draw=0)

    def update(model: Any, step: int) -> None:
        for layer in layers.values():
            accumulate_probe_gradients(layer)
        if step % config.update_interval or step >= total_steps:
            return
        for name, layer in layers.items():
            if layer.probe_indices is not None and torch.distributed.is_available() \
                    and torch.distributed.is_initialized():  # every rank regrows the same
                torch.distributed.all_reduce(layer.probe_grad_sum)
            prune_and_regrow(layer, config, optimizer.state(layer.sparse_values))
            draw_probes(layer, name, config, draw=step)

    hooks.after_step.append(update)
