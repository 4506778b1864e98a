"""Build a training run from a recipe: accelerator, model, adapter, data, optimizer."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peftune.adapters.hooks import AdapterHooks
from peftune.errors import InputError
from peftune.recipe.schema import Recipe


@dataclass
class BuiltRun:
    recipe: Recipe
    accelerator: Any
    model: Any  # as prepared by Accelerate
    unwrapped_model: Any
    tokenizer: Any
    hooks: AdapterHooks
    optimizer: Any
    scheduler: Any
    rows: list
    val_rows: list | None
    total_steps: int
    data_stats: dict
    trainable_params: int
    total_params: int
    setup_s: float
    quiet: bool = False

    def batches_for_epoch(self, epoch: int) -> Sequence[dict]:
        from peftune.data import micro_batches

        cfg = self.recipe
        return micro_batches(self.rows, batch_size=cfg.train.batch_size,
                             pad_id=self.tokenizer.pad_token_id, seed=cfg.train.seed,
                             epoch=epoch, packing=cfg.data.packing)

    def val_batches(self) -> Sequence[dict] | None:
        from peftune.data import micro_batches

        if not self.val_rows:
            return None
        cfg = self.recipe
        return micro_batches(self.val_rows, batch_size=cfg.train.batch_size,
                             pad_id=self.tokenizer.pad_token_id, seed=cfg.train.seed, epoch=0,
                             packing=cfg.data.packing)


def total_steps(recipe: Recipe, *, micro_batches_per_epoch: int) -> int:
    """`train.max_steps`, or epochs x micro-batches per epoch / grad_accum, rounded up."""
    if recipe.train.max_steps is not None:
        return recipe.train.max_steps
    micro_batches = recipe.train.epochs * micro_batches_per_epoch
    return max(1, math.ceil(micro_batches / recipe.train.grad_accum))


def mixed_precision(precision: str, device: Any) -> str:
    """Accelerate's mixed-precision mode for `train.precision` on this device."""
    import torch

    cuda = device.type == "cuda"
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and not cuda:
        raise InputError("train.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def _accelerator(precision: str) -> Any:
    """An Accelerator for this run. Accelerate keeps its settings in a process-wide singleton;
    a second run in the same process (a notebook, the tests) may ask for another precision, so
    the per-run part of that state is reset (the process-group part is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision", precision)
    if getattr(current, "value", current) != precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=precision)


def build_training(recipe: Recipe, *, quiet: bool = False) -> BuiltRun:
    import torch
    from accelerate.utils import set_seed

    from peftune.adapters import apply_adapter, get_method
    from peftune.adapters.common import count_parameters
    from peftune.data import build_datasets, pack_rows
    from peftune.models import load_model, load_tokenizer, resolve_model_path
    from peftune.train.optim import build_optimizer, build_scheduler

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = _accelerator(mixed_precision(recipe.train.precision, device))
    if accelerator.num_processes > 1:
        raise InputError("multi-process training is not supported yet: run one process "
                         "(see the scale-out issue)")
    # Data first (it needs only the tokenizer): bad data fails before the model loads.
    tokenizer = load_tokenizer(resolve_model_path(recipe.model.path),
                               trust_remote_code=recipe.model.trust_remote_code)
    data, selection = recipe.data, None
    if data.select is not None:
        from peftune.select.training import select_for_training

        data, selection = select_for_training(data, quiet=quiet)
    splits = build_datasets(data, tokenizer, seed=recipe.train.seed)
    rows = pack_rows(splits.train, max_length=recipe.data.max_length,
                     packing=recipe.data.packing, seed=recipe.train.seed)
    val_rows = None
    if splits.val is not None and len(splits.val):
        val_rows = pack_rows(splits.val, max_length=recipe.data.max_length,
                             packing=recipe.data.packing, seed=recipe.train.seed)

    steps = total_steps(recipe, micro_batches_per_epoch=-(-len(rows) // recipe.train.batch_size))
    spec = get_method(recipe.adapter.method)
    set_seed(recipe.train.seed)
    model = load_model(
        recipe.model, recipe.quant, device=accelerator.device,
        gradient_checkpointing=recipe.train.gradient_checkpointing,
        trains_base_weights=spec.trains_base_weights,
    )
    model, hooks = apply_adapter(
        model, recipe.adapter, tokenizer=tokenizer, total_steps=steps,
        learning_rate=recipe.train.lr, seed=recipe.train.seed,
        model_path=resolve_model_path(recipe.model.path),
        calibration_batches=lambda calibration: calibration_batches(
            recipe, tokenizer, splits.train, calibration))
    trainable_params, total_params = count_parameters(model)
    if trainable_params == 0:
        raise InputError(f"adapter: method {spec.name} left no trainable parameter; check "
                         "adapter.target_modules")

    optimizer = build_optimizer(model, recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train, steps)
    # The scheduler is stepped by the loop once per optimizer step, so it is not prepared.
    prepared_model, optimizer = accelerator.prepare(model, optimizer)
    return BuiltRun(
        recipe=recipe, accelerator=accelerator, model=prepared_model,
        unwrapped_model=accelerator.unwrap_model(prepared_model), tokenizer=tokenizer,
        hooks=hooks, optimizer=optimizer, scheduler=scheduler, rows=rows, val_rows=val_rows,
        total_steps=steps, data_stats=_data_stats(splits.stats, selection), trainable_params=trainable_params,
        total_params=total_params, setup_s=time.perf_counter() - started, quiet=quiet,
    )


def calibration_batches(recipe: Recipe, tokenizer: Any, train_set: Any, calibration: Any) -> list[dict]:
    """`adapter.calibration.examples` examples (seeded draw) of the training data, or of
    `adapter.calibration.data` read like data.train, as padded micro-batches."""
    import numpy as np

    from peftune.data import build_datasets, micro_batches, pack_rows

    data = train_set
    if calibration.data is not None:
        section = recipe.data.model_copy(update={
            "train": calibration.data, "val": None, "val_ratio": 0.0, "select": None,
            "max_examples": None})
        data = build_datasets(section, tokenizer, seed=recipe.train.seed).train
    if len(data) == 0:
        raise InputError("adapter.calibration: the calibration data has no examples")
    order = np.random.default_rng(recipe.train.seed).permutation(len(data))
    chosen = data.select(order[:calibration.examples])
    rows = pack_rows(chosen, max_length=recipe.data.max_length, packing=False,
                     seed=recipe.train.seed)
    return list(micro_batches(rows, batch_size=calibration.batch_size,
                              pad_id=tokenizer.pad_token_id, seed=recipe.train.seed, epoch=0,
                              packing=False))


def _data_stats(stats: dict, selection: dict | None) -> dict:
    """The data numbers a run reports, with the selection's when data.select chose the rows."""
    out = dict(stats)
    if selection is not None:
        out["selection"] = {
            "method": selection["method"], "k": selection["k"],
            "pool_size": selection["pool_size"], "kl_reduction": selection["kl"]["reduction"],
            "random_kl_reduction": selection["kl"]["random_reduction"],
            "cached": selection["cached"], "dir": selection["dir"],
        }
    return out
