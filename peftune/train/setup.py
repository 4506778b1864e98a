"""Build a training run from a recipe: accelerator, model, adapter, data, optimizer.

Multi-process runs (torchrun, `accelerate launch`, `peftune train --nproc N`): every rank
builds the same rows from the same seed; the main process tokenizes first (into the data
cache) while the others wait, then they read the cache. The process group gets a long
timeout (PEFTUNE_DIST_TIMEOUT seconds, default 24 h) so a rank waiting on long preprocessing
never times out. An InputError raised on the main process is raised on every rank (marked
`shown_by_main`, so only rank 0 prints it) instead of leaving the others waiting.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peftune.adapters.hooks import AdapterHooks
from peftune.device import native_bf16
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


def total_steps(recipe: Recipe, *, micro_batches_per_epoch: int, num_processes: int = 1) -> int:
    """`train.max_steps`, or epochs x micro-batches per epoch / (grad_accum x processes),
    rounded up: each optimizer step takes grad_accum micro-batches on every process."""
    if recipe.train.max_steps is not None:
        return recipe.train.max_steps
    micro_batches = recipe.train.epochs * micro_batches_per_epoch
    return max(1, math.ceil(micro_batches / (recipe.train.grad_accum * num_processes)))


# ---- multi-process helpers: every rank calls them at the same point ------------------------

def process_state() -> Any:
    """Accelerate's process state, creating the process group (when launched with several
    processes) with a long timeout: ranks wait for the main one's tokenizing at a collective."""
    from datetime import timedelta

    from accelerate.state import PartialState

    if PartialState._shared_state:
        return PartialState()
    seconds = float(os.environ.get("PEFTUNE_DIST_TIMEOUT", 24 * 3600))
    # Without a GPU, Accelerate forms a multi-process (gloo) group only when told cpu=True.
    return PartialState(cpu=_no_gpu(), timeout=timedelta(seconds=seconds))


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def _broadcast(state: Any, value: Any) -> Any:
    import torch.distributed as dist

    box = [value if state.is_main_process else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _shared_error(lines: list[str], *, from_rank: int, state: Any) -> InputError:
    err = InputError(*lines)
    err.shown_by_main = state.process_index != 0  # rank 0 prints it; the others exit quietly
    err.from_rank = from_rank
    return err


def run_on_main(state: Any, fn: Any, *, share_result: bool = False) -> Any:
    """Run `fn` on the main process only, the others waiting. An InputError it raises is
    raised on every rank; its result reaches every rank when `share_result` (else None)."""
    if state.num_processes == 1:
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    if state.is_main_process:
        try:
            outcome = ("ok", fn())
        except InputError as err:
            outcome = ("error", err.lines)
        sent = outcome if share_result or outcome[0] == "error" else ("ok", None)
        _broadcast(state, sent)
    else:
        outcome = _broadcast(state, None)
    if outcome[0] == "error":
        if state.is_main_process:
            raise InputError(*outcome[1])
        raise _shared_error(outcome[1], from_rank=0, state=state)
    return outcome[1] if (share_result or state.is_main_process) else None


def main_first(state: Any, fn: Any) -> Any:
    """Run `fn` on the main process first (tokenizing into the cache), then on the others
    (reading it). An InputError on any rank is raised on every rank."""
    if state.num_processes == 1:
        return fn()
    result = run_on_main(state, fn, share_result=False)
    return agree(state, fn) if not state.is_main_process else agree(state, lambda: result)


def agree(state: Any, fn: Any) -> Any:
    """Every rank runs `fn` (which must hold no collective); when any rank raised an
    InputError, every rank raises the first failing rank's error."""
    if state.num_processes == 1:
        return fn()
    import torch.distributed as dist

    result, lines = None, None
    try:
        result = fn()
    except InputError as err:
        lines = err.lines
    gathered: list[Any] = [None] * state.num_processes
    dist.all_gather_object(gathered, lines)
    failed = [(rank, got) for rank, got in enumerate(gathered) if got is not None]
    if failed:
        rank, got = failed[0]
        err = _shared_error(got, from_rank=rank, state=state)
        if state.process_index == 0 and rank != 0:
            err.lines = [f"rank {rank}: {line}" for line in got]
        raise err
    return result


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
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    current = AcceleratorState._shared_state.get("_mixed_precision", precision)
    if getattr(current, "value", current) != precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    fsdp_on_cpu = _fsdp_on_cpu()  # before Accelerator(), which fails on these settings
    accelerator = Accelerator(mixed_precision=precision, cpu=_no_gpu(),
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
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or not _no_gpu():
        return False
    if os.environ.get("FSDP_VERSION", "1") != "2":  # every rank finds it; rank 0 prints it
        from peftune.train.launch import found_on_every_rank

        raise found_on_every_rank("fsdp_config.fsdp_version: FSDP version 1 needs a GPU; on "
                                  "CPU use fsdp_version: 2 (configs/fsdp_cpu.yaml)")
    return True


def build_training(recipe: Recipe, *, quiet: bool = False) -> BuiltRun:
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
    rows = pack_rows(splits.train, max_length=recipe.data.max_length,
                     packing=recipe.data.packing, seed=recipe.train.seed)
    val_rows = None
    if splits.val is not None and len(splits.val):
        val_rows = pack_rows(splits.val, max_length=recipe.data.max_length,
                             packing=recipe.data.packing, seed=recipe.train.seed)

    steps = total_steps(recipe, micro_batches_per_epoch=-(-len(rows) // recipe.train.batch_size),
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
        if count_parameters(model)[0] == 0:
            raise InputError(f"adapter: method {spec.name} left no trainable parameter; check "
                             "adapter.target_modules")
        return model, hooks

    model, hooks = agree(state, model_and_adapter)
    trainable_params, total_params = count_parameters(model)

    optimizer = build_optimizer(model, recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train, steps)
    # The scheduler is stepped by the loop once per optimizer step, so it is not prepared.
    prepared_model, optimizer = accelerator.prepare(model, optimizer)
    # train.strategy's hooks (LISA's layer sampling), once DDP has seen every parameter
    hooks = apply_strategy(recipe.train, model=model, optimizer=optimizer, hooks=hooks)
    return BuiltRun(
        recipe=recipe, accelerator=accelerator, model=prepared_model,
        unwrapped_model=accelerator.unwrap_model(prepared_model), tokenizer=tokenizer,
        hooks=hooks, optimizer=optimizer, scheduler=scheduler, rows=rows, val_rows=val_rows,
        total_steps=steps, data_stats=_data_stats(splits.stats, selection), trainable_params=trainable_params,
        total_params=total_params, setup_s=time.perf_counter() - started, quiet=quiet,
    )


def any_rank(state: Any, flag: Any) -> Any:
    """`flag()` true on any process (a signal reached one rank): one all-reduce per call."""
    if state.num_processes == 1:
        return flag

    def agreed() -> bool:
        import torch

        local = torch.tensor([1.0 if flag() else 0.0], device=state.device)
        return bool(state.reduce(local, reduction="sum").item() > 0)

    return agreed


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
