"""A built run's weights to and from disk: a checkpoint of the current step, restoring one on
`--resume`, and the final export (`adapter/` or `model/`), written through a temp dir so that
it is whole or absent. Under FSDP or DeepSpeed the sharded weights and optimizer state are
gathered first (peftune/train/sharded.py).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from peftune.interrupts import interrupt_signum
from peftune.train.checkpoint import (
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from peftune.train.interrupts import FinishInterrupted, signals_recorded
from peftune.train.setup import BuiltRun


def restore(built: BuiltRun, checkpoint: Path) -> TrainerState:
    """Load a checkpoint into the built run: weights, optimizer, scheduler, RNG; the state."""
    from peftune.train.sharded import engine, load_optimizer, load_trainable

    state, trainable, training = load_checkpoint(checkpoint)
    if engine(built.accelerator) is None:
        built.hooks.load_trainable_state(built.unwrapped_model, trainable)
    else:  # full tensors in the checkpoint, shards in the model
        load_trainable(built.accelerator, built.model, built.hooks.load_trainable_state, trainable)
    load_optimizer(built.accelerator, built.model, built.optimizer, training["optimizer"],
                   training.get("optimizer_format"))
    built.scheduler.load_state_dict(training["scheduler"])
    set_rng_state(training["rng"])
    return state


def checkpoint_now(built: BuiltRun, out: Path, state: TrainerState, *, elapsed: float) -> Path:
    """Write `checkpoints/step-N` for `state` (the main process; under a sharding engine every
    rank takes part in gathering the weights first)."""
    from peftune.train.sharded import BY_NAME, full_parameters, snapshot

    gathered = snapshot(built.accelerator, built.unwrapped_model)  # FSDP/DeepSpeed: full
    with full_parameters(built.unwrapped_model, gathered and gathered.trainable):
        trainable = built.hooks.trainable_state(built.unwrapped_model)
    return save_checkpoint(
        out, state=replace(state, elapsed_s=elapsed), trainable=trainable,
        optimizer=built.optimizer, scheduler=built.scheduler,
        keep=built.recipe.train.keep_checkpoints,
        optimizer_state=(gathered.optimizer, BY_NAME) if gathered else None,
    )


def export(built: BuiltRun, out: Path) -> Path:
    """Write the final adapter/ (or model/) through a temp dir, so it is whole or absent."""
    final = out / built.hooks.artifact
    tmp = out / f".tmp-{built.hooks.artifact}"
    from peftune.train.sharded import full_parameters, snapshot

    shutil.rmtree(tmp, ignore_errors=True)
    gathered = snapshot(built.accelerator, built.unwrapped_model, take=True)  # FSDP/DeepSpeed
    with full_parameters(built.unwrapped_model, gathered and gathered.trainable):
        built.hooks.export(built.unwrapped_model, tmp, built.tokenizer)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def export_interrupted(built: BuiltRun, out: Path, state: TrainerState, err: BaseException, *,
                       elapsed: float) -> FinishInterrupted:
    """The export was cut short: remove its temp dir and make sure a checkpoint holds the
    trained weights (written now when the last step has none), so --resume exports them."""
    with signals_recorded(err):
        shutil.rmtree(out / f".tmp-{built.hooks.artifact}", ignore_errors=True)
        latest = latest_checkpoint(out)
        if latest is None or latest.name != f"step-{state.step}":
            latest = checkpoint_now(built, out, state, elapsed=elapsed)
        built.accelerator.wait_for_everyone()  # the other ranks wait here for rank 0's export
    return FinishInterrupted(
        interrupt_signum(err), state.step, latest,
        f"while writing {out / built.hooks.artifact} after step {state.step}: nothing was "
        f"written there; the trained weights are in {latest}")
