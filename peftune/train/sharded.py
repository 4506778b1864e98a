"""Checkpoints and the export under sharding engines (FSDP, DeepSpeed), where each process
holds only a shard of the parameters and of the optimizer state.

Every process takes part in the gather (`gathered(...)`, called by the loop on every rank at a
checkpoint and at the end): the trainable weights become full tensors, and the optimizer state
one full state keyed by parameter name, on rank 0, which then writes the checkpoint or the
export exactly as in a one-process run (`full_parameters` shows the method's hooks a model
whose trainable parameters are those full tensors). A checkpoint therefore does not depend on
the number of processes: it resumes on any number of them, under FSDP, DDP or one process.

- FSDP (versions 1 and 2): torch.distributed.checkpoint's `get_model_state_dict` (frozen
  parameters skipped, so only the trainable ones are gathered) and `get_optimizer_state_dict`
  with `full_state_dict=True`; restored with the matching `set_*` calls, every rank reading the
  same files. Verified on CPU with FSDP2 (tests/test_fsdp.py); FSDP1 needs a GPU.
- DeepSpeed: the weights through `accelerator.get_state_dict` (ZeRO-3 gathers them in 16 bit:
  `zero3_save_16bit_model: true`). ZeRO partitions the optimizer state inside its own engine,
  which peftune does not gather: such a checkpoint holds no optimizer state and `--resume`
  refuses it. Not verified (DeepSpeed needs CUDA).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# The optimizer state's format in training_state.pt: "by-name" is torch.distributed.checkpoint's
# full optimizer state dict (keyed by parameter name); absent means optimizer.state_dict().
BY_NAME = "by-name"


@dataclass
class Snapshot:
    """What rank 0 writes from: full trainable tensors and the full optimizer state."""

    trainable: dict  # parameter name -> full tensor (CPU)
    optimizer: dict | None  # by name; None under DeepSpeed (not gathered)


_snapshots: dict[int, Snapshot] = {}  # id(unwrapped model) -> its latest gather, on rank 0


def engine(accelerator: Any) -> str | None:
    """"fsdp" or "deepspeed" when the parameters may be sharded, else None."""
    from accelerate.utils import DistributedType

    kind = getattr(accelerator, "distributed_type", None)
    return {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(kind)


def trainable_names(model: Any) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def gather(accelerator: Any, model: Any, optimizer: Any | None) -> Snapshot | None:
    """On every rank (collectives): the full trainable weights and optimizer state (not when
    `optimizer` is None), on rank 0 (None on the others, and when nothing is sharded)."""
    kind = engine(accelerator)
    if kind is None:
        return None
    unwrapped = accelerator.unwrap_model(model)
    names = set(trainable_names(unwrapped))
    if kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True,
                                   ignore_frozen_params=True)
        weights = get_model_state_dict(model, options=options)
        optim = None if optimizer is None else get_optimizer_state_dict(
            model, _inner(optimizer), options=options)
    else:  # DeepSpeed: ZeRO-3 gathers the 16-bit weights; the optimizer stays in the engine
        weights, optim = accelerator.get_state_dict(model), None
    if not accelerator.is_main_process:
        return None
    trainable = {name: weights[name].detach().to("cpu", copy=True).contiguous()
                 for name in names if name in weights}
    missing = sorted(names - set(trainable))
    if missing:
        from peftune.errors import TrainingError

        raise TrainingError(f"the {kind} gather returned no full tensor for {missing[0]} "
                            f"(and {len(missing) - 1} more); cannot write a checkpoint")
    return Snapshot(trainable=trainable, optimizer=optim)


@contextlib.contextmanager
def gathered(accelerator: Any, model: Any, optimizer: Any) -> Iterator[None]:
    """Gather (every rank) for the checkpoint written inside the block (rank 0)."""
    snap = gather(accelerator, model, optimizer)
    key = None if snap is None else id(accelerator.unwrap_model(model))
    if key is not None:
        _snapshots[key] = snap
    try:
        yield
    finally:
        _snapshots.pop(key, None)


def keep_for_export(accelerator: Any, model: Any) -> None:
    """Gather (every rank) the final weights, which rank 0's export then takes."""
    snap = gather(accelerator, model, None)
    if snap is not None:
        _snapshots[id(accelerator.unwrap_model(model))] = snap


def snapshot(accelerator: Any, unwrapped: Any, *, take: bool = False) -> Snapshot | None:
    """The gather rank 0 writes from (`take`: and forget it); None when nothing is sharded.
    Under a sharding engine a write without one is a bug (it would save one rank's shards)."""
    if engine(accelerator) is None:
        return None
    snap = _snapshots.pop(id(unwrapped), None) if take else _snapshots.get(id(unwrapped))
    if snap is None:
        raise RuntimeError("sharded engine: no gathered weights to write from (the loop "
                           "gathers at every checkpoint and at the end)")
    return snap


@contextlib.contextmanager
def full_parameters(model: Any, tensors: dict | None) -> Iterator[None]:
    """The trainable parameters named in `tensors` replaced by them (full tensors) inside the
    block, so a method's hooks read, write or save them as in a one-process run; the sharded
    originals are put back after. Nothing happens when `tensors` is None."""
    if tensors is None:
        yield
        return
    import torch

    swapped = []
    for name, tensor in tensors.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        swapped.append((module, leaf, module._parameters[leaf]))
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=True)
    try:
        yield
    finally:
        for module, leaf, original in reversed(swapped):
            module._parameters[leaf] = original


def load_trainable(accelerator: Any, model: Any, load: Any, state: dict) -> None:
    """Restore a checkpoint's trainable tensors (full, as written) into a sharded model, on
    every rank: the method's `load(model, state)` fills full stand-ins, which are then
    scattered into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    unwrapped = accelerator.unwrap_model(model)
    if engine(accelerator) == "deepspeed":
        raise_deepspeed_resume()
    full = {name: state[name].clone() if name in state else None
            for name in trainable_names(unwrapped)}
    if any(v is None for v in full.values()):
        load(unwrapped, state)  # the method's own check names what does not match
    with full_parameters(unwrapped, full):
        load(unwrapped, state)
        filled = {name: p.detach().clone() for name, p in unwrapped.named_parameters()
                  if name in full}
    set_model_state_dict(model, filled, options=StateDictOptions(full_state_dict=True,
                                                                  strict=False))


def load_optimizer(accelerator: Any, model: Any, optimizer: Any, saved: dict,
                   fmt: str | None) -> None:
    """Restore the optimizer state, whichever way it was saved, on any engine but DeepSpeed:
    a by-name state through torch.distributed.checkpoint (which shards it under FSDP), a
    one-process/DDP `optimizer.state_dict()` converted to by-name first under FSDP."""
    kind = engine(accelerator)
    if kind == "deepspeed":
        raise_deepspeed_resume()
    if saved is None:
        _raise_on_every_rank("--resume: this checkpoint was written under DeepSpeed and holds no "
                             "optimizer state (ZeRO keeps it partitioned); it cannot be resumed "
                             "exactly. Start again with --overwrite")
    if fmt != BY_NAME and kind is None:
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if fmt != BY_NAME:
        saved = optimizer_state_by_name(saved, optimizer, accelerator.unwrap_model(model))
    set_optimizer_state_dict(model, _inner(optimizer), saved,
                             options=StateDictOptions(full_state_dict=True))


def optimizer_state_by_name(saved: dict, optimizer: Any, model: Any) -> dict:
    """An `optimizer.state_dict()` (states keyed by position in the param groups) keyed by
    parameter name instead, as torch.distributed.checkpoint writes it. The positions are those
    of this optimizer's param groups, built in the same order on every engine."""
    names = {id(p): name for name, p in model.named_parameters()}
    inner = _inner(optimizer)
    position_to_name = {}
    for group, saved_group in zip(inner.param_groups, saved["param_groups"], strict=True):
        for param, position in zip(group["params"], saved_group["params"], strict=True):
            position_to_name[position] = names[id(param)]
    groups = [{**g, "params": [position_to_name[i] for i in g["params"]]}
              for g in saved["param_groups"]]
    return {"state": {position_to_name[i]: s for i, s in saved["state"].items()},
            "param_groups": groups}


def raise_deepspeed_resume() -> None:
    _raise_on_every_rank("--resume: under DeepSpeed peftune does not restore ZeRO's partitioned "
                         "optimizer state, so it cannot resume exactly; resume under FSDP, DDP "
                         "or one process, or start again with --overwrite")


def _raise_on_every_rank(message: str) -> None:
    from peftune.dist import found_on_every_rank

    raise found_on_every_rank(message)


def _inner(optimizer: Any) -> Any:
    """The torch optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
