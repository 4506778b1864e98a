"""One training session in a run directory: header, loop, checkpoints, export, summary."""

from __future__ import annotations

import shutil
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

from peftune.interrupts import interrupt_signum
from peftune.models.sources import describe_source
from peftune.train.checkpoint import (
    RunInterrupted,
    StopRequest,
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from peftune.train.loop import Loop, run_loop
from peftune.train.reporting import (
    MetricsLog,
    ProgressDisplay,
    Timer,
    format_log_line,
    peak_memory_bytes,
    perplexity,
    plot_losses,
    write_summary,
)


def run_session(built: Any, out: Path, checkpoint: Path | None) -> dict:
    from peftune.evaluate.command import eval_after_training, prepare_recipe_eval
    from peftune.recipe import recipe_to_yaml
    from peftune.train.setup import any_rank, run_on_main

    recipe = built.recipe
    accelerator = built.accelerator
    main = accelerator.is_main_process  # rank 0 writes and prints; the others train only

    def start_files() -> Any:
        eval_tasks = prepare_recipe_eval(recipe, built.tokenizer, out)  # bad eval data: stop now
        (out / "recipe.yaml").write_text(_source_comment(recipe.model.path) + recipe_to_yaml(recipe))
        selection = built.data_stats.get("selection")
        if selection is not None:  # the rows data.select chose: the run says what it trained on
            _keep_selection(Path(selection["dir"]), out / "selection")
        return eval_tasks

    eval_tasks = run_on_main(accelerator, start_files)
    state = restore(built, checkpoint) if checkpoint is not None else TrainerState()
    metrics = MetricsLog(out / "metrics.jsonl",
                         resume_step=state.step if checkpoint is not None else None, enabled=main)
    timer = Timer()
    display = ProgressDisplay(total_steps=built.total_steps, start_step=state.step,
                              enabled=not built.quiet and main)
    _print_header(built, display, resumed_from=checkpoint)

    last_checkpoint: list[Path] = []

    def on_log(record: dict) -> None:
        metrics.write(record)
        display.advance(record["step"], f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                                        f"{record['tokens_per_s']:,.0f} tok/s")
        display.log(format_log_line(record, built.total_steps))

    def on_eval(record: dict) -> None:
        record["val_ppl"] = perplexity(record["val_loss"])
        metrics.write(record)
        display.log(f"step {record['step']:>5}/{built.total_steps}  val loss "
                    f"{record['val_loss']:.4f}  val ppl {record['val_ppl']:.2f}")

    def on_save(current: TrainerState) -> None:
        if main:
            path = checkpoint_now(built, out, current, elapsed=current.elapsed_s + timer.elapsed())
        else:  # the main process writes it (the weights and optimizer are the same on all)
            path = out / "checkpoints" / f"step-{current.step}"
        accelerator.wait_for_everyone()
        last_checkpoint[:] = [path]

    loop = Loop(
        model=built.model, optimizer=built.optimizer, scheduler=built.scheduler,
        hooks=built.hooks, accelerator=built.accelerator,
        batches_for_epoch=built.batches_for_epoch, total_steps=built.total_steps,
        grad_accum=recipe.train.grad_accum, max_grad_norm=recipe.train.max_grad_norm,
        log_every=recipe.train.log_every, eval_every=recipe.train.eval_every,
        save_every=recipe.train.save_every, val_batches=built.val_batches(),
        chunked_loss=recipe.train.chunked_loss,
        on_step=display.advance, on_log=on_log, on_eval=on_eval, on_save=on_save,
        num_processes=accelerator.num_processes, process_index=accelerator.process_index,
    )
    with StopRequest(announce=main) as stop, display:
        loop.should_stop = any_rank(accelerator, stop)  # all ranks stop at the same step
        state = run_loop(loop, state, timer=timer)
        if state.step < built.total_steps and loop.should_stop():  # SIGINT/SIGTERM: save, exit
            if not (last_checkpoint and last_checkpoint[0].name == f"step-{state.step}"):
                on_save(state)
            raise RunInterrupted(stop.signum or signal.SIGTERM, state.step, last_checkpoint[0])
    train_seconds = state.elapsed_s + timer.elapsed()
    if not main:  # rank 0 exports, plots, evaluates and summarises
        accelerator.wait_for_everyone()
        return {"steps": state.step, "tokens": state.tokens, "process_index": accelerator.process_index}

    peak = peak_memory_bytes(built.accelerator.device)  # of training, before export and plot
    try:
        artifact = _export(built, out)
    except KeyboardInterrupt as stop_export:  # Ctrl-C / SIGTERM while the adapter is written
        raise _export_interrupted(built, out, state, stop_export, elapsed=train_seconds) from None
    records = metrics.read()
    plot = plot_losses(records, out / "loss.png")
    summary = _summary(built, state, records, artifact, plot, train_seconds, peak)
    if eval_tasks:  # the recipe's eval: block, on the trained model, into out/eval
        try:
            summary["eval"] = eval_after_training(
                recipe, eval_tasks, out=out, quiet=built.quiet, model=built.unwrapped_model,
                tokenizer=built.tokenizer)
        except KeyboardInterrupt as stop_eval:  # the run is whole; only its eval is missing
            with _signals_recorded(stop_eval):
                write_summary(out / "summary.json", summary)
                accelerator.wait_for_everyone()  # the other ranks wait here for rank 0
            raise FinishInterrupted(
                interrupt_signum(stop_eval), state.step, artifact,
                f"during the recipe's eval after training: {artifact} and summary.json are "
                f"complete, {out / 'eval'} was not written (peftune eval {out} runs it)",
                resumable=False) from None
    write_summary(out / "summary.json", summary)
    _print_footer(display, out, summary)
    accelerator.wait_for_everyone()
    return summary


class FinishInterrupted(RunInterrupted):
    """SIGINT/SIGTERM after the last optimizer step: while exporting or evaluating."""

    def __init__(self, signum: int, step: int, checkpoint: Path, what: str, *,
                 resumable: bool = True):
        super().__init__(signum, step, checkpoint)
        self.resumable = resumable
        self.args = (f"interrupted ({signal.Signals(signum).name}) {what}",)


def _signals_recorded(err: BaseException) -> StopRequest:
    """While active, a further SIGINT/SIGTERM only says the stop is under way."""
    hold = StopRequest()
    hold.signum = interrupt_signum(err)
    return hold


def _export_interrupted(built: Any, out: Path, state: TrainerState, err: BaseException, *,
                        elapsed: float) -> FinishInterrupted:
    """The export was cut short: remove its temp dir and make sure a checkpoint holds the
    trained weights (written now when the last step has none), so --resume exports them."""
    with _signals_recorded(err):
        shutil.rmtree(out / f".tmp-{built.hooks.artifact}", ignore_errors=True)
        latest = latest_checkpoint(out)
        if latest is None or latest.name != f"step-{state.step}":
            latest = checkpoint_now(built, out, state, elapsed=elapsed)
        built.accelerator.wait_for_everyone()  # the other ranks wait here for rank 0's export
    return FinishInterrupted(
        interrupt_signum(err), state.step, latest,
        f"while writing {out / built.hooks.artifact} after step {state.step}: nothing was "
        f"written there; the trained weights are in {latest}")


def restore(built: Any, checkpoint: Path) -> TrainerState:
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


def checkpoint_now(built: Any, out: Path, state: TrainerState, *, elapsed: float) -> Path:
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


def _export(built: Any, out: Path) -> Path:
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


def _summary(built: Any, state: TrainerState, records: list[dict], artifact: Path,
             plot: Path | None, seconds: float, peak: dict) -> dict:
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    return {
        "method": built.recipe.adapter.method,
        "steps": state.step,
        "epochs": _epochs_done(built, state),
        "final_loss": train[-1]["loss"] if train else None,
        "final_val_loss": val[-1]["val_loss"] if val else None,
        "tokens": state.tokens,
        "target_tokens": state.target_tokens,
        "train_seconds": round(seconds - state.val_s, 3),  # optimizer steps only
        "val_seconds": round(state.val_s, 3),
        "setup_seconds": round(built.setup_s, 3),
        "tokens_per_s": state.tokens / (seconds - state.val_s) if seconds > state.val_s else None,
        "trainable_params": built.trainable_params,
        "adapter_init": built.hooks.init_report,
        "total_params": built.total_params,
        **peak,
        "artifact": str(artifact),
        "plot": str(plot) if plot else None,
        "data": built.data_stats,
        "model_source": describe_source(built.recipe.model.path),
    }


def _keep_selection(cached: Path, into: Path) -> None:
    """The selected rows and the selection's report, hard-linked from the selection cache
    (copied where a link cannot be made): they stay with the run if the cache is cleared."""
    import os

    into.mkdir(parents=True, exist_ok=True)
    for name in ("selected.jsonl", "report.json", "select.yaml"):
        source = cached / name
        if not source.is_file():
            continue
        try:
            os.link(source, into / name)
        except OSError:
            shutil.copy2(source, into / name)


def _base_params(built: Any) -> int:
    """The base model's own parameters: the total less an adapter's added ones."""
    from peftune.adapters import get_method

    if get_method(built.recipe.adapter.method).trains_base_weights:
        return built.total_params
    return built.total_params - built.trainable_params


def _epochs_done(built: Any, state: TrainerState) -> float:
    """Epochs of data consumed, as a fraction (0.21 after a fifth of one)."""
    per_epoch = len(built.batches_for_epoch(state.epoch))
    return round(state.epoch + (state.batch_in_epoch / per_epoch if per_epoch else 0), 4)


def _source_comment(model_path: str) -> str:
    """recipe.yaml's first lines for a GGUF or catalogue model: the file and its sha256."""
    source = describe_source(model_path)
    if source is None:
        return ""
    lines = [f"# model.path {model_path}: " + (f"catalogue model, {source['package']}, "
                                                 if "catalogue" in source else "") + "GGUF file",
             f"#   {source['gguf']}", f"#   sha256 {source['sha256']}",
             f"#   converted to {source['converted']}"]
    return "\n".join(lines) + "\n"


def _print_header(built: Any, display: ProgressDisplay, *, resumed_from: Path | None) -> None:
    r = built.recipe
    precision = str(built.accelerator.mixed_precision)
    precision = "fp32" if precision == "no" else precision
    procs = built.accelerator.num_processes
    tokens_per_step = r.train.batch_size * r.train.grad_accum * procs * r.data.max_length
    lines = [
        f"model {r.model.path}  quant {r.quant.method}  adapter {r.adapter.method}  "
        f"device {built.accelerator.device}  precision {precision}",
        f"trainable parameters {built.trainable_params:,} "
        f"({100 * built.trainable_params / max(_base_params(built), 1):.2f}% of the base model's "
        f"{_base_params(built):,})",
        f"data: {len(built.rows):,} rows of <= {r.data.max_length} tokens "
        f"({'packed' if r.data.packing else 'padded'}); batch {r.train.batch_size} x accumulation "
        f"{r.train.grad_accum}" + (f" x {procs} processes" if procs > 1 else "") +
        f" = {r.train.batch_size * r.train.grad_accum * procs} rows, "
        f"<= {tokens_per_step:,} tokens per optimizer step; {built.total_steps} steps",
    ]
    init = built.hooks.init_report
    if init:
        details = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in init.items())
        lines.append(f"adapter init ({r.adapter.method}): {details}")
    selection = built.data_stats.get("selection")
    if selection is not None:
        reused = "cached, " if selection["cached"] else ""
        lines.append(f"data.select: {selection['method']} chose {selection['k']:,} of "
                     f"{selection['pool_size']:,} rows ({reused}KL reduction "
                     f"{selection['kl_reduction']:.3f}, random {selection['random_kl_reduction']:.3f})"
                     f"; {selection['dir']}")
    if resumed_from is not None:
        lines.append(f"resuming from {resumed_from}")
    for line in lines:
        display.log(line)


def _print_footer(display: ProgressDisplay, out: Path, summary: dict) -> None:
    loss = summary["final_loss"]
    val = summary["final_val_loss"]
    display.log(
        f"done: {summary['steps']} steps in {summary['train_seconds']:.1f}s, "
        f"final loss {loss:.4f}" + (f", val loss {val:.4f}" if val is not None else "")
    )
    display.log(f"  {Path(summary['artifact']).name + '/':<10} {summary['artifact']}")
    display.log(f"  {'metrics':<10} {out / 'metrics.jsonl'}")
    if summary["plot"]:
        display.log(f"  {'plot':<10} {summary['plot']}")
    display.log(f"  {'summary':<10} {out / 'summary.json'}")
