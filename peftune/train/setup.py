"""Build a training run from a recipe: accelerator, model, adapter, data, optimizer.

Multi-process runs (torchrun, `accelerate launch`, `peftune train --nproc N`): every rank
builds the same rows from the same seed; the main process tokenizes first (into the data
cache) while the others wait, then they read the cache (`main_first`). An InputError raised
on one rank is raised on every rank instead of leaving the others waiting (peftune/dist.py).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftune.adapters.hooks import AdapterHooks
from peftune.device import has_cuda, native_bf16
from peftune.dist import agree, found_on_every_rank, main_first, process_state
from peftune.errors import InputError
from peftune.recipe.schema import Recipe
from peftune.train.objectives import Objective, build_objective
from peftune.train.reference import ReferenceLogps

if TYPE_CHECKING:
    from peftune.data import TrainingMix


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
    objective: Objective | None = None
    reference: ReferenceLogps | None = None  # log π_ref for dpo, ln-dpo, ipo, kto
    # a data mix draws every epoch anew (data/mix.py); `rows` are then its first epoch's
    mix: TrainingMix | None = None

    def batches_for_epoch(self, epoch: int) -> Sequence[dict]:
        rows = self.rows if self.mix is None else self.mix.rows(epoch)
        return run_batches(self.recipe, rows, self.tokenizer, epoch=epoch)

    def val_batches(self) -> Sequence[dict] | None:
        if not self.val_rows:
            return None
        return run_batches(self.recipe, self.val_rows, self.tokenizer, epoch=0)


def run_batches(recipe: Recipe, rows: list, tokenizer: Any, *, epoch: int) -> Sequence[dict]:
    """One epoch's micro-batches of `rows` (a preference pair always shares its row)."""
    from peftune.data import micro_batches

    pairs = bool(rows) and rows[0].roles is not None and len(rows[0].lengths) > 1
    return micro_batches(rows, batch_size=recipe.train.batch_size,
                         pad_id=tokenizer.pad_token_id, seed=recipe.train.seed, epoch=epoch,
                         packing=recipe.data.packing or pairs)


def total_steps(recipe: Recipe, *, micro_batches_per_epoch: int | Sequence[int],
                num_processes: int = 1) -> int:
    """`train.max_steps`, or epochs x micro-batches per epoch / (grad_accum x processes),
    rounded up: each optimizer step takes grad_accum micro-batches on every process. Epochs
    of different sizes (a data mix packs each epoch's draw anew) are given one count per
    epoch, ceil(train.epochs) of them: the whole epochs' counts add up, and a fraction of an
    epoch takes that fraction of the next."""
    if recipe.train.max_steps is not None:
        return recipe.train.max_steps
    epochs = recipe.train.epochs
    if isinstance(micro_batches_per_epoch, int):
        micro_batches = epochs * micro_batches_per_epoch
    else:
        whole = math.floor(epochs)
        micro_batches = sum(micro_batches_per_epoch[:whole])
        if epochs > whole:
            micro_batches += (epochs - whole) * micro_batches_per_epoch[whole]
    return max(1, math.ceil(micro_batches / (recipe.train.grad_accum * num_processes)))


def mixed_precision(precision: str, device: Any, *, cpu_flags: set[str] | None = None) -> str:
    """Accelerate's mixed-precision mode for `train.precision` on this device. `auto`: bf16
    autocast on a GPU that supports it and on a CPU with native bf16 arithmetic
    (peftune/device.py), else fp32 (emulated bf16 on CPU is far slower than fp32)."""
    cuda = device.type == "cuda"
    if precision == "auto":
        return "bf16" if native_bf16(device, flags=cpu_flags) else "no"
    if precision == "fp16" and not cuda:
        raise InputError("train.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def _accelerator(precision: str, handlers: Sequence[Any] = ()) -> Any:
    """An Accelerator for this run. Accelerate keeps its settings in a process-wide singleton;
    a second run in the same process (a notebook, the tests) may ask for another precision, so
    the per-run part of that state is reset (the process-group part is kept)."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from peftune.compat import accelerator_mixed_precision, reset_accelerator_state

    if accelerator_mixed_precision() not in (None, precision):
        reset_accelerator_state()
    fsdp_on_cpu = _fsdp_on_cpu()  # before Accelerator(), which fails on these settings
    accelerator = Accelerator(mixed_precision=precision, cpu=not has_cuda(),
                              kwargs_handlers=list(handlers))
    if fsdp_on_cpu and accelerator.distributed_type == DistributedType.MULTI_CPU:
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from FSDP_* vars
        # Both states: every AcceleratorState() copies the process state's type over its own.
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
    return accelerator


def _fsdp_on_cpu() -> bool:
    """Launched with an FSDP config on a machine without a GPU, Accelerate (1.x) forms a gloo
    group but quietly trains with DDP: its FSDP branch is for GPU process types only. FSDP
    version 2 (torch's fully_shard) shards over gloo on CPU, so peftune then switches the state
    to FSDP with the plugin read from the launcher's FSDP_* variables (True here). Version 1
    cannot run on CPU (torch: "Inconsistent compute device and `device_id`: cpu vs cpu:0"):
    refused, rather than run as DDP under a name it is not."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or has_cuda():
        return False
    if os.environ.get("FSDP_VERSION", "1") != "2":  # every rank finds it; rank 0 prints it
        raise found_on_every_rank("fsdp_config.fsdp_version: FSDP version 1 needs a GPU; on "
                                  "CPU use fsdp_version: 2 (configs/fsdp_cpu.yaml)")
    return True


def build_training(recipe: Recipe, *, quiet: bool = False,
                   plain_svd: dict | None = None) -> BuiltRun:
    """Data, model, adapter, optimizer and schedule of a run, ready for the loop. `plain_svd`
    (`peftune compensate`): filled with the plain-SVD fit EoRA's report compares against."""
    import torch
    from accelerate.utils import set_seed

    from peftune.adapters import apply_adapter, get_method
    from peftune.adapters.common import count_parameters
    from peftune.data import build_datasets, pack_rows
    from peftune.models import load_model, load_tokenizer, resolve_model_path
    from peftune.train.optim import build_optimizer, build_scheduler
    from peftune.train.strategies import apply_strategy, strategy_handlers

    started = time.perf_counter()
    state = process_state()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = _accelerator(mixed_precision(recipe.train.precision, device),
                               handlers=strategy_handlers(recipe.train, recipe.adapter))
    agree(state, lambda: check_engine(recipe, accelerator))
    # Data first (it needs only the tokenizer): bad data fails before the model loads.
    tokenizer = agree(state, lambda: load_tokenizer(
        resolve_model_path(recipe.model.path), trust_remote_code=recipe.model.trust_remote_code))

    def tokenized() -> tuple:  # the main process first (it fills the caches), then the rest
        data, selection = recipe.data, None
        if data.select is not None:
            from peftune.select.training import select_for_training

            data, selection = select_for_training(data, quiet=quiet or not state.is_main_process)
        return selection, build_datasets(data, tokenizer, seed=recipe.train.seed)

    selection, splits = main_first(state, tokenized)
    rows, mix, per_epoch = training_rows(recipe, splits)
    val_rows = None
    if splits.val is not None and len(splits.val):
        val_rows = pack_rows(splits.val, max_length=recipe.data.max_length,
                             packing=recipe.data.packing, seed=recipe.train.seed)

    steps = total_steps(recipe, micro_batches_per_epoch=per_epoch,
                        num_processes=accelerator.num_processes)
    spec = get_method(recipe.adapter.method)

    def model_and_adapter() -> tuple:  # on every rank; an InputError on one stops them all
        set_seed(recipe.train.seed)
        model = load_model(
            recipe.model, recipe.quant, device=accelerator.device,
            gradient_checkpointing=recipe.train.gradient_checkpointing,
            trains_base_weights=spec.trains_base_weights,
        )
        context = getattr(model.config, "max_position_embeddings", None)
        if isinstance(context, int) and recipe.data.max_length > context:  # a hub model
            raise InputError(f"data.max_length: {recipe.data.max_length} is more than the "
                             f"model's context of {context} positions "
                             f"(max_position_embeddings); use at most {context}")
        model, hooks = apply_adapter(
            model, recipe.adapter, tokenizer=tokenizer, total_steps=steps,
            learning_rate=recipe.train.lr, seed=recipe.train.seed,
            model_path=resolve_model_path(recipe.model.path),
            calibration_batches=lambda calibration: calibration_batches(
                recipe, tokenizer, splits.train, calibration))
        if recipe.quant.compensation is not None:  # EoRA: the adapter starts as the correction
            hooks.init_report.update(compensate_quantized(recipe, model, tokenizer, splits.train,
                                                          plain_svd=plain_svd))
        if count_parameters(model)[0] == 0:
            raise InputError(f"adapter: method {spec.name} left no trainable parameter; check "
                             "adapter.target_modules")
        return model, hooks

    model, hooks = agree(state, model_and_adapter)
    trainable_params, total_params = count_parameters(model)

    every_example = rows  # what a precomputed reference scores: each example once
    if mix is not None and recipe.train.objective.uses_reference:  # epochs look them up
        every_example = pack_rows(splits.train, max_length=recipe.data.max_length,
                                  packing=recipe.data.packing, seed=recipe.train.seed)
    reference = agree(state, lambda: _reference(recipe, model, accelerator, tokenizer,
                                                 every_example, val_rows, splits))
    optimizer = build_optimizer(model, recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train, steps)
    # The scheduler is stepped by the loop once per optimizer step, so it is not prepared.
    prepared_model, optimizer = accelerator.prepare(model, optimizer)
    for bind in hooks.bind_optimizer:  # methods that move the optimizer's state (SpIEL)
        bind(optimizer)
    # train.strategy's hooks (LISA's layer sampling), once DDP has seen every parameter
    hooks = apply_strategy(recipe.train, model=model, optimizer=optimizer, hooks=hooks)
    return BuiltRun(
        recipe=recipe, accelerator=accelerator, model=prepared_model,
        unwrapped_model=accelerator.unwrap_model(prepared_model), tokenizer=tokenizer,
        hooks=hooks, optimizer=optimizer, scheduler=scheduler, rows=rows, val_rows=val_rows,
        total_steps=steps, data_stats=_data_stats(splits.stats, selection), trainable_params=trainable_params,
        total_params=total_params, setup_s=time.perf_counter() - started, quiet=quiet,
        objective=build_objective(recipe.train.objective, chunked=recipe.train.chunked_loss),
        reference=reference, mix=mix,
    )


def training_rows(recipe: Recipe, splits: Any) -> tuple[list, TrainingMix | None,
                                                       int | list[int]]:
    """The first epoch's rows; the TrainingMix that draws each epoch of a data mix (else
    None: every epoch shuffles the same rows); the micro-batches per epoch, for total_steps
    (for a mix, one count per epoch: each epoch packs its own draw)."""
    from peftune.data import TrainingMix, pack_rows

    data, train = recipe.data, recipe.train
    if splits.sources is None:
        rows = pack_rows(splits.train, max_length=data.max_length, packing=data.packing,
                         seed=train.seed)
        return rows, None, -(-len(rows) // train.batch_size)
    mix = TrainingMix(splits.train, splits.sources, seed=train.seed,
                      max_length=data.max_length, packing=data.packing)
    first = mix.rows(0)
    epochs = 0 if train.max_steps is not None else math.ceil(train.epochs)
    per_epoch = [-(-mix.row_count(epoch) // train.batch_size) for epoch in range(epochs)]
    return first, mix, per_epoch


def _reference(recipe: Recipe, model: Any, accelerator: Any, tokenizer: Any, rows: list,
               val_rows: list | None, splits: Any) -> ReferenceLogps | None:
    """The objective's reference log-probs (train/reference.py), from the starting model."""
    from peftune.train.reference import build_reference

    val = run_batches(recipe, val_rows, tokenizer, epoch=0) if val_rows else None
    sizes = (len(splits.train), len(splits.val) if splits.val is not None else 0)
    return build_reference(recipe, model=model, accelerator=accelerator,
                           batches=run_batches(recipe, rows, tokenizer, epoch=0),
                           val_batches=val, sizes=sizes)


def check_engine(recipe: Recipe, accelerator: Any) -> None:
    """What the loop needs from a DeepSpeed run: it steps the engine once per optimizer step
    (so no accumulation inside it) and must know the micro-batch (no dataloader is prepared).
    Under FSDP and ZeRO-3 the recipe's eval: block cannot run after training: rank 0 evaluates
    alone, and a sharded model's forward needs every process."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    sharded = kind == DistributedType.FSDP or (kind == DistributedType.DEEPSPEED and (
        accelerator.state.deepspeed_plugin.zero_stage == 3))
    if sharded and recipe.eval.tasks:
        raise InputError(f"eval: the model is sharded across the processes ({kind.value}), so "
                         "the eval: block cannot run after training; move it to a file and run "
                         "`peftune eval RUN_DIR --config FILE` on the finished run")
    if kind != DistributedType.DEEPSPEED:
        return
    if recipe.train.grad_accum != 1:
        raise InputError("train.grad_accum: under DeepSpeed peftune steps the engine every "
                         f"micro-batch, so grad_accum must be 1 (got {recipe.train.grad_accum}); "
                         "raise train.batch_size or the number of processes instead")
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = recipe.train.batch_size


def compensate_quantized(recipe: Recipe, model: Any, tokenizer: Any, train_set: Any, *,
                         plain_svd: dict | None = None) -> dict:
    """Set the LoRA adapter to EoRA's compensation of the quantized base (`quant.compensation`,
    `peftune.quant.eora`); returns its report (reconstruction errors before and after)."""
    from peftune.models import resolve_model_path
    from peftune.quant.eora import compensate

    settings = recipe.quant.compensation
    key = "quant.compensation.calibration"
    batches = calibration_batches(recipe, tokenizer, train_set, settings.calibration, key=key)
    return compensate(model, resolve_model_path(recipe.model.path), batches, damp=settings.damp,
                      plain_svd=plain_svd)


def calibration_batches(recipe: Recipe, tokenizer: Any, train_set: Any, calibration: Any, *,
                        key: str = "adapter.calibration") -> list[dict]:
    """`calibration.examples` examples (seeded draw) of the training data, or of
    `calibration.data` read like data.train, as padded micro-batches; `key` names the
    section in a refusal."""
    import numpy as np

    from peftune.data import TokenizedSet, build_datasets, micro_batches, pack_rows

    data = train_set
    if calibration.data is not None:
        section = recipe.data.model_copy(update={
            "train": calibration.data, "val": None, "val_ratio": 0.0, "select": None,
            "max_examples": None})
        try:
            data = build_datasets(section, tokenizer, seed=recipe.train.seed).train
        except InputError as err:  # read as data.train, named as what it is
            raise InputError(*(line.replace("data.train", f"{key}.data", 1)
                               for line in err.lines)) from None
    if len(data) == 0:
        raise InputError(f"{key}: the calibration data has no examples; give a data file "
                         "with examples in data.format, or leave data unset for data.train")
    # Preference pairs calibrate as their sequences, each on its own (a draw breaks pairs).
    data = TokenizedSet(data.input_ids, data.labels, data.offsets)
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
