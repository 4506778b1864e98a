"""`peftune train`: set up model, adapter, data and optimizer from a recipe, run the loop,
export the artifacts and describe the run in its directory.

Nothing is written to the output directory until the recipe, the model and the data have
all loaded: bad input leaves no half-made run behind.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from peftune.errors import InputError
from peftune.recipe.schema import Recipe
from peftune.train.checkpoint import (
    check_free_space,
    probe_output_location,
    remove_partial_checkpoints,
    resumable_checkpoint,
)

# Keys that may change between a run and its `--resume` (they do not change what is trained;
# output.dir differs when a run directory was moved or copied).
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs", "train.log_every", "train.eval_every",
                     "train.save_every", "train.keep_checkpoints", "output.dir"}


def check_output_dir(out: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to clobber a run by accident; returns the checkpoint to resume from, if any."""
    if resume and overwrite:
        raise InputError("--resume and --overwrite contradict each other; pass one of them")
    if out.exists() and not out.is_dir():
        raise InputError(f"output.dir: {out} exists and is not a directory")
    non_empty = out.is_dir() and any(out.iterdir())
    if resume:
        checkpoint, notes = resumable_checkpoint(out) if non_empty else (None, [])
        for note in notes:  # corrupted or truncated checkpoints: one line each
            print(f"warning: {note}", file=sys.stderr)
        if checkpoint is None and notes:
            raise InputError(f"--resume: no valid checkpoint in {out}/checkpoints (each one "
                             "failed its manifest check); start again with --overwrite")
        if checkpoint is None:
            raise InputError(f"--resume: no checkpoint in {out}/checkpoints; start the run "
                             "without --resume (set train.save_every to write checkpoints)")
        return checkpoint
    if non_empty and not overwrite and _stopped_before_anything(out):
        print(f"note: {out} holds a run that stopped before its first checkpoint or export; "
              "starting it again", file=sys.stderr)
        return None
    if non_empty and not overwrite:
        raise InputError(f"output.dir: {out} is not empty; pass --resume to continue it, "
                         "--overwrite to replace it, or choose another output.dir")
    if non_empty and not (out / "recipe.yaml").is_file():
        # --overwrite deletes the directory: only ever a previous run's.
        raise InputError(f"--overwrite: {out} is not a peftune run directory (no recipe.yaml); "
                         "refusing to delete it. Choose another output.dir")
    return None


def _stopped_before_anything(out: Path) -> bool:
    """A run directory with its recipe but no checkpoint, artifact or summary: nothing to
    resume and nothing to lose, so a plain rerun may start it again (it was left by a run
    killed early: a crash while loading, the kernel's OOM killer)."""
    if not (out / "recipe.yaml").is_file():
        return False
    kept = {"recipe.yaml", "metrics.jsonl", "checkpoints"}
    names = {item.name for item in out.iterdir()}
    checkpoints = out / "checkpoints"
    return names <= kept and not (checkpoints.is_dir() and any(checkpoints.iterdir()))


def run_train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False,
              quiet: bool = False) -> dict:
    """Train as the recipe says; returns the run summary (also written to summary.json)."""
    out = Path(recipe.output.dir)

    def check_output() -> Path | None:
        checkpoint = check_output_dir(out, resume=resume, overwrite=overwrite)
        if checkpoint is not None:
            _check_same_recipe(recipe, out)
        check_data_paths(recipe)
        probe_output_location(out)  # read-only or full: fail now, not at the first checkpoint
        return checkpoint

    # Several processes (torchrun, accelerate launch): rank 0 checks and makes the output
    # directory, the others wait; an InputError there stops every rank.
    processes = _process_state()
    checkpoint = check_output() if processes is None else run_on_main(
        processes, check_output, share_result=True)

    from peftune.train.session import run_session
    from peftune.train.setup import build_training

    built = build_training(recipe, quiet=quiet)  # loads model + data; may raise InputError

    def make_output() -> None:
        check_free_space(out, _trainable_bytes(built.model) * (2 if recipe.train.save_every else 1))
        if checkpoint is None:
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
        else:
            remove_partial_checkpoints(out)

    if processes is None:
        make_output()
    else:
        run_on_main(processes, make_output)
    return run_session(built, out, checkpoint)


def _process_state():
    """Accelerate's process state when launched with several processes, else None (and no
    torch import, so a one-process run's checks stay quick)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from peftune.train.setup import process_state

    return process_state()


def run_on_main(processes, fn, **kwargs):
    from peftune.train.setup import run_on_main as on_main

    return on_main(processes, fn, **kwargs)


def _trainable_bytes(model) -> int:
    """What one copy of the trained weights takes: a floor for a checkpoint or the export."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def check_data_paths(recipe: Recipe) -> None:
    """The data files exist and are of a kind we read: checked before any model loads."""
    from peftune.data.sources import resolve_source

    calibration = getattr(recipe.adapter, "calibration", None)
    paths = [("data.train", recipe.data.train), ("data.val", recipe.data.val),
             ("adapter.calibration.data", getattr(calibration, "data", None))]
    paths += [(f"eval.tasks[{i}].data", task.data) for i, task in enumerate(recipe.eval.tasks)]
    for key, path in paths:
        if path is not None:
            resolve_source(path, key=key)


def _check_same_recipe(recipe: Recipe, out: Path) -> None:
    from peftune.recipe import load_recipe

    saved_path = out / "recipe.yaml"
    if not saved_path.is_file():
        raise InputError(f"--resume: {saved_path} is missing; this is not a peftune run directory")
    saved = load_recipe(saved_path).model_dump()
    diff = _flat_diff(saved, recipe.model_dump())
    changed = sorted(key for key in diff if key not in RESUMABLE_CHANGES)
    length = sorted(diff & {"train.max_steps", "train.epochs"})
    if length and recipe.adapter.schedules_by_length:
        raise InputError(f"--resume: adapter.method {recipe.adapter.method} schedules by the "
                         f"run's length, so {length[0]} must stay as the run's recipe.yaml has it")
    if length and not changed:
        _check_extension(recipe, saved, length[0])
    if changed:
        raise InputError(f"--resume: the recipe differs from the run's recipe.yaml in "
                         f"{', '.join(changed)}; resume with the same recipe or use --overwrite")


def _check_extension(recipe: Recipe, saved: dict, key: str) -> None:
    """A new length on --resume: fine for a constant learning rate (said in one line); a
    decaying schedule is laid over the run's length, so a new one would make the rate jump
    (a finished cosine run climbs back from 0): refused."""
    train = recipe.train
    old = saved["train"][key.split(".")[1]]
    new = getattr(train, key.split(".")[1])
    if train.scheduler == "constant" and (train.warmup_steps is not None or train.warmup_ratio == 0):
        print(f"note: --resume with {key} {new} (the run had {old}): the learning rate stays "
              f"constant at {train.lr:g}", file=sys.stderr)
        return
    raise InputError(
        f"--resume: {key} is {new}, the run's recipe.yaml has {old}; its {train.scheduler} "
        f"schedule{' and warmup_ratio are' if train.warmup_ratio else ' is'} laid over the run's "
        f"length, so the learning rate would jump (a finished run would climb back from its "
        f"final rate); resume with {key}={old}, or train a new run (scheduler: constant with "
        "warmup_steps can be extended)")


def _flat_diff(a: dict, b: dict, prefix: str = "") -> set[str]:
    keys = set(a) | set(b)
    diff = set()
    for key in keys:
        path = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diff |= _flat_diff(va, vb, path + ".")
        elif va != vb:
            diff.add(path)
    return diff
