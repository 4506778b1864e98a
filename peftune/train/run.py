"""`peftune train`, one run from start to end: check the output directory, build the model,
adapter, data and optimizer, write `recipe.yaml`, restore a checkpoint, run the loop, export,
evaluate, summarise.

Nothing is written to the output directory until the recipe, the model and the data have
all loaded: bad input leaves no half-made run behind. With several processes (torchrun,
`accelerate launch`, `--nproc N`) every rank trains; rank 0 alone checks and writes the run
directory, prints, exports and evaluates, the others waiting for it (peftune/dist.py).

    output.py     the output directory: checks, `--resume`, recipe.yaml
    setup.py      the BuiltRun: accelerator, model + adapter, data, optimizer, scheduler
    artifacts.py  checkpoints, restoring one, the export
    loop.py       the optimizer steps
    reporting.py  metrics.jsonl, the progress display, the first and last lines, summary.json
    interrupts.py SIGINT/SIGTERM: stop at a step boundary with a checkpoint
"""

from __future__ import annotations

import signal
from pathlib import Path

from peftune import dist
from peftune.interrupts import interrupt_signum
from peftune.recipe.schema import Recipe
from peftune.train.artifacts import checkpoint_now, export, export_interrupted, restore
from peftune.train.card import write_model_card
from peftune.train.checkpoint import TrainerState
from peftune.train.interrupts import (
    FinishInterrupted,
    RunInterrupted,
    StopRequest,
    signals_recorded,
)
from peftune.train.loop import Loop, run_loop
from peftune.train.output import check_output, make_output_dir, start_run_dir
from peftune.train.reporting import (
    MetricsLog,
    ProgressDisplay,
    Timer,
    format_log_line,
    peak_memory_bytes,
    perplexity,
    plot_losses,
    print_footer,
    print_header,
    run_summary,
    write_summary,
)
from peftune.train.setup import BuiltRun, build_training
from peftune.train.trackers import Trackers


def run_train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False,
              quiet: bool = False) -> dict:
    """Train as the recipe says; returns the run summary (also written to summary.json)."""
    out = Path(recipe.output.dir)
    # The output directory, checked by rank 0 while the others wait (an InputError there stops
    # every rank); one process imports no torch for it, so that its checks stay quick.
    processes = dist.process_state() if dist.world_size() > 1 else None
    checkpoint = dist.run_on_main(
        processes, lambda: check_output(recipe, out, resume=resume, overwrite=overwrite),
        share_result=True)
    built = build_training(recipe, quiet=quiet)  # loads model + data; may raise InputError
    dist.run_on_main(processes, lambda: make_output_dir(built, out, resume_from=checkpoint))
    return train_built(built, out, resume_from=checkpoint)


def train_built(built: BuiltRun, out: Path, *, resume_from: Path | None = None) -> dict:
    """Train a built run into `out` (made and empty, or holding the checkpoint `resume_from`);
    returns the summary. Tests call it directly to keep the built run (its trained model)."""
    # recipe.yaml (and the recipe's eval data, read now: bad eval data stops the run here)
    eval_tasks = dist.run_on_main(built.accelerator, lambda: start_run_dir(built, out))
    state = restore(built, resume_from) if resume_from is not None else TrainerState()
    calls = LoopCallbacks(built, out, state=state, resumed=resume_from is not None)
    try:
        return _train_and_finish(built, out, calls, state, eval_tasks, resume_from)
    except BaseException as err:  # a stop to resume (a signal), or a failure
        calls.trackers.close("KILLED" if isinstance(err, RunInterrupted | KeyboardInterrupt)
                             else "FAILED")
        raise


def _train_and_finish(built: BuiltRun, out: Path, calls: LoopCallbacks, state: TrainerState,
                      eval_tasks: list | None, resume_from: Path | None) -> dict:
    """train_built's loop, export, eval and summary."""
    recipe, accelerator = built.recipe, built.accelerator
    main = accelerator.is_main_process  # rank 0 writes and prints; the others train only
    print_header(built, calls.display, resumed_from=resume_from)

    loop = Loop(
        model=built.model, optimizer=built.optimizer, scheduler=built.scheduler,
        hooks=built.hooks, accelerator=accelerator,
        batches_for_epoch=built.batches_for_epoch, total_steps=built.total_steps,
        grad_accum=recipe.train.grad_accum, max_grad_norm=recipe.train.max_grad_norm,
        log_every=recipe.train.log_every, eval_every=recipe.train.eval_every,
        save_every=recipe.train.save_every, val_batches=built.val_batches(),
        objective=built.objective,
        reference=built.reference.train if built.reference else None,
        val_reference=built.reference.val if built.reference else None,
        on_step=calls.display.advance, on_log=calls.on_log, on_eval=calls.on_eval,
        on_save=calls.on_save,
        num_processes=accelerator.num_processes, process_index=accelerator.process_index,
    )
    with StopRequest(announce=main) as stop, calls.display:
        loop.should_stop = dist.any_rank(accelerator, stop)  # all ranks stop at the same step
        state = run_loop(loop, state, timer=calls.timer)
        if state.step < built.total_steps and loop.should_stop():  # SIGINT/SIGTERM: save, exit
            raise calls.stopped(state, stop.signum or signal.SIGTERM)
    train_seconds = state.elapsed_s + calls.timer.elapsed()
    if not main:  # rank 0 exports, plots, evaluates and summarises
        accelerator.wait_for_everyone()
        return {"steps": state.step, "tokens": state.tokens, "process_index": accelerator.process_index}

    peak = peak_memory_bytes(accelerator.device)  # of training, before export and plot
    try:
        artifact = export(built, out)
    except KeyboardInterrupt as stop_export:  # Ctrl-C / SIGTERM while the adapter is written
        raise export_interrupted(built, out, state, stop_export, elapsed=train_seconds) from None
    records = calls.metrics.read()
    plot = plot_losses(records, out / "loss.png")
    summary = run_summary(built, state, records, artifact, plot, train_seconds, peak)
    if eval_tasks:  # the recipe's eval: block, on the trained model, into out/eval
        from peftune.evaluate.command import eval_after_training

        try:
            summary["eval"] = eval_after_training(
                recipe, eval_tasks, out=out, quiet=built.quiet, model=built.unwrapped_model,
                tokenizer=built.tokenizer)
        except KeyboardInterrupt as stop_eval:  # the run is whole; only its eval is missing
            raise _eval_interrupted(built, out, summary, stop_eval, step=state.step,
                                    artifact=artifact) from None
    if calls.trackers.items:
        summary["trackers"] = calls.trackers.describe()
    write_summary(out / "summary.json", summary)
    write_model_card(out, summary, out / "recipe.yaml")
    calls.trackers.close("FINISHED", [out / "summary.json", out / "README.md", out / "loss.png"])
    print_footer(calls.display, out, summary)
    accelerator.wait_for_everyone()
    return summary


class LoopCallbacks:
    """What the loop calls back into: each logged step and validation to metrics.jsonl and the
    display, each checkpoint written (by rank 0) and remembered. Holds the run's timer."""

    def __init__(self, built: BuiltRun, out: Path, *, state: TrainerState, resumed: bool):
        main = built.accelerator.is_main_process
        self.built, self.out = built, out
        self.metrics = MetricsLog(out / "metrics.jsonl", resume_step=state.step if resumed else None,
                                  enabled=main)
        # TensorBoard / MLflow (output.report_to), given what metrics.jsonl holds up to a resume
        self.trackers = dist.run_on_main(built.accelerator, lambda: Trackers.open(
            built.recipe, out, resume_step=state.step if resumed else None,
            history=self.metrics.read() if resumed else [])) or Trackers()
        self.timer = Timer()
        self.display = ProgressDisplay(total_steps=built.total_steps, start_step=state.step,
                                       enabled=not built.quiet and main)
        self.last_checkpoint: Path | None = None

    def on_log(self, record: dict) -> None:
        self.metrics.write(record)
        self.trackers.log(record)
        accuracy = record.get("reward_accuracy")
        shown = f"  acc {accuracy:.0%}" if accuracy is not None else ""
        self.display.advance(record["step"], f"loss {record['loss']:.4f}{shown}  lr "
                                             f"{record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s")
        self.display.log(format_log_line(record, self.built.total_steps))

    def on_eval(self, record: dict) -> None:
        preference = self.built.objective.name != "sft"
        if not preference:
            record["val_ppl"] = perplexity(record["val_loss"])
        self.metrics.write(record)
        self.trackers.log(record)
        if "val_reward_accuracy" in record:
            shown = (f"val reward acc {record['val_reward_accuracy']:.1%}  margin "
                     f"{record['val_reward_margin']:.3f}")
        elif preference:  # kto: unpaired, no accuracy
            shown = f"val margin {record['val_reward_margin']:.3f}  kl {record['val_kl']:.3f}"
        else:
            shown = f"val ppl {record['val_ppl']:.2f}"
        self.display.log(f"step {record['step']:>5}/{self.built.total_steps}  val loss "
                         f"{record['val_loss']:.4f}  {shown}")

    def on_save(self, current: TrainerState) -> None:
        self.last_checkpoint = self._checkpoint(current)

    def stopped(self, state: TrainerState, signum: int) -> RunInterrupted:
        """The loop stopped at `state` on a signal: its checkpoint, written now unless the
        last step already wrote one."""
        checkpoint = self.last_checkpoint
        if checkpoint is None or checkpoint.name != f"step-{state.step}":
            checkpoint = self.last_checkpoint = self._checkpoint(state)
        return RunInterrupted(signum, state.step, checkpoint)

    def _checkpoint(self, state: TrainerState) -> Path:
        accelerator = self.built.accelerator
        if accelerator.is_main_process:
            path = checkpoint_now(self.built, self.out, state,
                                  elapsed=state.elapsed_s + self.timer.elapsed())
        else:  # the main process writes it (the weights and optimizer are the same on all)
            path = self.out / "checkpoints" / f"step-{state.step}"
        accelerator.wait_for_everyone()
        return path


def _eval_interrupted(built: BuiltRun, out: Path, summary: dict, err: BaseException, *,
                      step: int, artifact: Path) -> FinishInterrupted:
    """A signal during the recipe's eval after training: the run is whole, so its summary is
    written (without the eval) and the stop is not to be resumed."""
    with signals_recorded(err):
        write_summary(out / "summary.json", summary)
        built.accelerator.wait_for_everyone()  # the other ranks wait here for rank 0
    return FinishInterrupted(
        interrupt_signum(err), step, artifact,
        f"during the recipe's eval after training: {artifact} and summary.json are "
        f"complete, {out / 'eval'} was not written (peftune eval {out} runs it)",
        resumable=False)
