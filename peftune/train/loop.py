"""The training loop: micro-batches with gradient accumulation, one optimizer step each.

The loss of an optimizer step is the sum of token losses of all its micro-batches divided
by the number of target tokens in all of them (a preference objective: of pair losses by
pairs; train/objectives.py), so `batch_size=8, grad_accum=1` and `batch_size=2,
grad_accum=4` give the same update. With N processes an optimizer step takes
N x grad_accum consecutive micro-batches, process r the r-th of every N (so N processes with
accumulation G train exactly as one process with accumulation N x G), and the target count is
summed over the processes (an all-reduce). The loop knows nothing of adapter
methods or objectives: it calls the hooks it was given (extra loss, before- and after-step)
and the objective's counts, loss and summary, and nothing else.

A forward-only optimizer (`forward_only = True`: zeroth order, peftune.train.zo) gets the
step's loss as a function (`step_loss_of`: forward passes at whatever weights it has set,
no autograd graph) in place of a backward pass, and reports `last_loss` and
`last_grad_norm` (for SPSA the |projected gradient|) for the log; clipping does not apply.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from peftune.adapters.hooks import AdapterHooks
from peftune.data.formats import IGNORE_INDEX
from peftune.errors import TrainingError
from peftune.train.checkpoint import TrainerState
from peftune.train.objectives import Objective
from peftune.train.sharded import engine, gathered, keep_for_export

BatchesForEpoch = Callable[[int], Sequence[dict]]  # epoch -> that epoch's micro-batches


@dataclass
class Loop:
    """Everything the loop touches, built by the run (run.py)."""

    model: Any
    optimizer: Any
    scheduler: Any
    hooks: AdapterHooks
    accelerator: Any
    batches_for_epoch: BatchesForEpoch
    total_steps: int
    grad_accum: int
    max_grad_norm: float | None
    log_every: int
    eval_every: int | None
    save_every: int | None
    val_batches: Sequence[dict] | None = None
    objective: Objective | None = None  # None: sft (next-token cross-entropy)
    reference: Callable[[dict], Any] | None = None  # log π_ref of a training batch
    val_reference: Callable[[dict], Any] | None = None  # ... of a validation batch
    # Callbacks into the run (logging, checkpoints); the loop does no I/O itself.
    on_step: Callable[[int], None] = lambda step: None
    on_log: Callable[[dict], None] = lambda record: None
    on_eval: Callable[[dict], None] = lambda record: None
    on_save: Callable[[TrainerState], None] = lambda state: None
    # Asked after every whole optimizer step: True ends the loop there (SIGINT/SIGTERM).
    should_stop: Callable[[], bool] = lambda: False
    # This process among `num_processes` (the data position is counted over all of them).
    num_processes: int = 1
    process_index: int = 0
    # The epoch whose (lazy) batch sequence is at hand: one at a time.
    _epoch: tuple[int, Sequence[dict]] | None = None


def count_targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_tokens(batch: dict) -> int:
    """Real (non-padding) tokens in a micro-batch, counted by the data layer."""
    return int(batch["num_tokens"])


def next_micro_batches(loop: Loop, state: TrainerState) -> list[dict]:
    """This process's `grad_accum` micro-batches of the next `grad_accum x num_processes`
    from the data position (process r takes every r-th of them), continuing into the next
    epoch when this one runs out (every optimizer step sees the batch the recipe asks for).
    Advances `state.epoch` / `state.batch_in_epoch`, which count micro-batches of all
    processes, so the position means the same on any number of processes."""
    taken: list[dict] = []
    world, rank = loop.num_processes, loop.process_index
    seen = 0
    while seen < loop.grad_accum * world:
        epoch_batches = _epoch(loop, state.epoch)
        if state.batch_in_epoch >= len(epoch_batches):
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            continue
        if seen % world == rank:  # only this process's batches are built
            taken.append(epoch_batches[state.batch_in_epoch])
        state.batch_in_epoch += 1
        seen += 1
    return taken


def step_totals(loop: Loop, batches: Sequence[dict], model: Any,
                reference: Callable[[dict], Any] | None,
                counted: Sequence[bool] | None = None) -> dict[str, float]:
    """The objective's normalisers (and step-wide statistics) over `batches` on every
    process, with `targets` and `tokens` counted too: the same dict on every rank.
    `counted` False: a batch that only keeps a sharded forward in step (not counted)."""
    import torch

    objective = _objective(loop)
    counted = [True] * len(batches) if counted is None else counted
    local: dict[str, float] = {"targets": 0.0, "tokens": 0.0}
    for batch in (b for b, count in zip(batches, counted, strict=True) if count):
        local["targets"] += count_targets(batch)
        local["tokens"] += count_tokens(batch)
        for name, value in objective.counts(batch).items():
            local[name] = local.get(name, 0.0) + value
    if objective.step_pass:
        with torch.no_grad():
            for batch, count in zip(batches, counted, strict=True):
                sums = objective.step_sums(model, _to(batch, loop.accelerator.device), reference)
                for name, value in sums.items():
                    local[name] = local.get(name, 0.0) + (value if count else 0.0)
    names = sorted(local)
    return dict(zip(names, global_sums(loop.accelerator, *(local[n] for n in names)),
                    strict=True))


def _objective(loop: Loop) -> Objective:
    if loop.objective is None:
        from peftune.recipe.schema import ObjectiveSection

        loop.objective = Objective(ObjectiveSection())
    return loop.objective


def add_sums(into: dict[str, float], sums: dict[str, float]) -> None:
    for name, value in sums.items():
        into[name] = into.get(name, 0.0) + value


def global_sums(accelerator: Any, *values: float) -> list[float]:
    """The values summed over all processes (one all-reduce); as they are on one process."""
    if accelerator.num_processes == 1:
        return list(values)
    import torch

    local = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(local, reduction="sum").tolist()


def _epoch(loop: Loop, epoch: int) -> Sequence[dict]:
    if loop._epoch is None or loop._epoch[0] != epoch:
        loop._epoch = (epoch, loop.batches_for_epoch(epoch))
    return loop._epoch[1]


def evaluate_loss(loop: Loop) -> dict:
    """The objective's loss over the validation batches (for sft the token-weighted mean
    loss), with the objective's metrics prefixed `val_`."""
    import torch

    model = loop.model
    objective = _objective(loop)
    batches = loop.val_batches or []
    counted = [True] * len(batches)
    if loop.num_processes > 1:  # each process its share; no DDP forward (it syncs buffers)
        model = loop.accelerator.unwrap_model(model)
        world = loop.num_processes
        mine = list(range(loop.process_index, len(batches), world))
        counted = [True] * len(mine)
        if engine(loop.accelerator) is not None and batches:
            # A sharded forward is a collective: every rank runs as many, the extra uncounted.
            extra = -(-len(batches) // world) - len(mine)
            mine, counted = mine + [0] * extra, counted + [False] * extra
        batches = [batches[i] for i in mine]
    model.eval()
    totals = step_totals(loop, batches, model, loop.val_reference, counted)
    total, sums = 0.0, {}
    with torch.no_grad(), loop.accelerator.autocast():
        for batch, count in zip(batches, counted, strict=True):
            loss, batch_sums = objective.loss(model, _to(batch, loop.accelerator.device),
                                              totals, loop.val_reference)
            if count:
                total += float(loss)
                add_sums(sums, batch_sums)
    model.train()
    names = sorted(sums)
    total, *values = global_sums(loop.accelerator, total, *(sums[n] for n in names))
    record = {"val_loss": total, "val_target_tokens": int(totals["targets"])}
    metrics = objective.summarize(dict(zip(names, values, strict=True)))
    record.update({f"val_{name}": value for name, value in metrics.items()})
    return record


def _to(batch: dict, device: Any) -> dict:
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}


def backward_pass(loop: Loop, batches: Sequence[dict], totals: dict[str, float],
                  sums: dict[str, float]) -> float:
    """Forward and backward over this process's micro-batches of a step (gradients
    accumulate, DDP synchronising on the last); the step's loss, the same on every rank."""
    import torch

    model, accelerator, hooks = loop.model, loop.accelerator, loop.hooks
    objective = _objective(loop)
    step_loss = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(batches):
        batch = _to(batch, accelerator.device)
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            task_loss, batch_sums = objective.loss(model, batch, totals, loop.reference)
            add_sums(sums, batch_sums)
            loss = task_loss * loop.num_processes  # DDP averages the gradients: undo it
            extra = hooks.extra_loss(model) if hooks.extra_loss is not None else None
            if extra is not None:  # a method's penalty may be off for part of the run
                loss = loss + extra / len(batches)
        accelerator.backward(loss)
        step_loss += task_loss.detach()
    return global_sums(accelerator, float(step_loss))[0]


def step_loss_of(loop: Loop, batches: Sequence[dict], totals: dict[str, float], model: Any,
                 sums: dict[str, float] | None = None) -> Callable[[], float]:
    """A function that gives the loss of this optimizer step's micro-batches (the objective's,
    plus a method's extra loss) at the weights as they are when it is called: forward passes
    only, no autograd graph, summed over the processes. Every call starts from the random
    state of this moment, so calls at different weights see the same dropout masks.
    `sums`: where the objective's metric sums of every call are added (for the log)."""
    import torch

    from peftune.train.checkpoint import rng_state, set_rng_state

    accelerator, hooks = loop.accelerator, loop.hooks
    objective = _objective(loop)
    start = rng_state()

    def step_loss() -> float:
        set_rng_state(start)
        total, extra = 0.0, None
        with torch.no_grad(), accelerator.autocast():
            for batch in batches:
                loss, batch_sums = objective.loss(model, _to(batch, accelerator.device), totals,
                                                  loop.reference)
                total += float(loss)
                if sums is not None:
                    add_sums(sums, batch_sums)
            if hooks.extra_loss is not None:
                extra = hooks.extra_loss(model)
        total = global_sums(accelerator, total)[0]
        return total + (float(extra) if extra is not None else 0.0)

    return step_loss


def stop_if_not_finite(loss_value: float, optimizer: Any, state: TrainerState) -> None:
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingError(
            f"the loss became {loss_value} at step {state.step + 1}; training stopped and "
            "the last checkpoint was left as it was. Lower train.lr, enable "
            "train.max_grad_norm, or check the data"
        )


def run_loop(loop: Loop, state: TrainerState, *, timer: Any) -> TrainerState:
    """Train from `state` until `total_steps`; returns the final state."""
    import torch

    model, optimizer, scheduler, hooks = loop.model, loop.optimizer, loop.scheduler, loop.hooks
    accelerator = loop.accelerator
    objective = _objective(loop)
    # forwards without gradients (the step pass) skip DDP's bookkeeping; a sharded model
    # needs its engine for every forward
    plain_model = model if engine(accelerator) is not None else accelerator.unwrap_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    unwrapped_optimizer = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's
    forward_only = getattr(unwrapped_optimizer, "forward_only", False)  # peftune.train.zo
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "start": timer.elapsed(), "sums": {}}

    def paused(work: Any, *, validation: bool = False) -> None:
        """Run `work` outside the throughput window: tokens/s counts training time only."""
        began = timer.elapsed()
        work()
        spent = timer.elapsed() - began
        window["start"] += spent
        if validation:
            state.val_s += spent

    def validate() -> None:
        loop.on_eval({"step": state.step, **evaluate_loss(loop)})

    model.train()
    if state.step == 0 and loop.val_batches:
        paused(validate, validation=True)  # the baseline the run improves on

    while state.step < loop.total_steps:
        micro_batches = next_micro_batches(loop, state)
        # Over all processes: each process's loss is its share of the step's mean loss.
        totals = step_totals(loop, micro_batches, plain_model, loop.reference)
        n_targets, step_tokens = int(totals["targets"]), int(totals["tokens"])
        for before_step in hooks.before_step:  # a strategy's look at the batch first (IST)
            before_step(model, state.step, step_loss_of(loop, micro_batches, totals, plain_model))
        state.tokens += step_tokens
        state.target_tokens += n_targets
        step_lr = scheduler.get_last_lr()[0]  # the rate this step is taken with

        if forward_only:
            # Zeroth order (train.strategy zo): the optimizer evaluates the step's loss at
            # perturbed weights and updates them itself: no backward pass, no gradients.
            optimizer.step(step_loss_of(loop, micro_batches, totals, plain_model, window["sums"]))
            loss_value, grad_norm = unwrapped_optimizer.last_loss, unwrapped_optimizer.last_grad_norm
            stop_if_not_finite(loss_value, optimizer, state)
        else:
            loss_value = backward_pass(loop, micro_batches, totals, window["sums"])
            stop_if_not_finite(loss_value, optimizer, state)
            if loop.max_grad_norm is not None:
                grad_norm = float(accelerator.clip_grad_norm_(trainable, loop.max_grad_norm))
            else:
                grad_norm = float(torch.linalg.vector_norm(torch.stack(
                    [p.grad.detach().float().norm() for p in trainable if p.grad is not None])))
            optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 loss scaling skips inf steps
            scheduler.step()
            for after_step in hooks.after_step:  # before zero_grad: some read the gradients
                after_step(model, state.step + 1)
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        loop.on_step(state.step)

        window["loss"] += loss_value
        window["steps"] += 1
        window["tokens"] += step_tokens
        if state.step % loop.log_every == 0 or state.step == loop.total_steps:
            seconds = max(timer.elapsed() - window["start"], 1e-9)
            names = sorted(window["sums"])
            summed = dict(zip(names, global_sums(accelerator, *(window["sums"][n] for n in names)),
                              strict=True))
            loop.on_log({
                "step": state.step,
                "epoch": state.epoch,
                "loss": window["loss"] / window["steps"],
                "lr": step_lr,
                "grad_norm": grad_norm,
                "tokens": state.tokens,
                "tokens_per_s": window["tokens"] / seconds,
                "elapsed_s": state.elapsed_s + timer.elapsed(),
                **objective.summarize(summed),
            })
            window = {"loss": 0.0, "steps": 0, "tokens": 0, "start": timer.elapsed(), "sums": {}}
        if loop.val_batches and (state.step == loop.total_steps or (
                loop.eval_every and state.step % loop.eval_every == 0)):
            paused(validate, validation=True)
        saved = bool(loop.save_every and state.step % loop.save_every == 0)
        if saved:
            def save() -> None:
                with gathered(accelerator, model, optimizer):  # sharded: every rank gathers
                    loop.on_save(state)

            paused(save)
        if loop.should_stop():  # a step boundary: save (unless just saved) and exit
            if not saved and state.step < loop.total_steps:
                with gathered(accelerator, model, optimizer):
                    loop.on_save(state)
            break
    if state.step >= loop.total_steps:  # sharded engines: the full weights rank 0 exports
        keep_for_export(accelerator, model)
    return state
