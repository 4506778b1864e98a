"""The run directory: refuse to clobber a run by accident, check what `--resume` continues,
make the directory, and write what describes the run before it trains (`recipe.yaml`, the
rows `data.select` chose).

Nothing is written to the output directory until the recipe, the model and the data have
all loaded: bad input leaves no half-made run behind.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from peftune.errors import InputError
from peftune.recipe.schema import Recipe
from peftune.train.checkpoint import (
    check_free_space,
    probe_output_location,
    remove_partial_checkpoints,
    resumable_checkpoint,
)

if TYPE_CHECKING:
    from peftune.train.setup import BuiltRun

# Keys that may change between a run and its `--resume` (they do not change what is trained;
# output.dir differs when a run directory was moved or copied).
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs", "train.log_every", "train.eval_every",
                     "train.save_every", "train.keep_checkpoints", "output.dir",
                     "output.report_to", "output.mlflow_tracking_uri", "output.mlflow_experiment"}


def check_output(recipe: Recipe, out: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Before anything loads: `out` may be written (and is this recipe's run on --resume), the
    data files exist; returns the checkpoint to resume from, if any."""
    checkpoint = check_output_dir(out, resume=resume, overwrite=overwrite)
    if checkpoint is not None:
        check_same_recipe(recipe, out)
    check_data_paths(recipe)
    probe_output_location(out)  # read-only or full: fail now, not at the first checkpoint
    return checkpoint


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
    kept = {"recipe.yaml", "metrics.jsonl", "checkpoints", "tensorboard", "mlflow.json"}
    names = {item.name for item in out.iterdir()}
    checkpoints = out / "checkpoints"
    return names <= kept and not (checkpoints.is_dir() and any(checkpoints.iterdir()))


def check_data_paths(recipe: Recipe) -> None:
    """The data files exist and are of a kind we read: checked before any model loads."""
    from peftune.data.sources import resolve_source

    calibration = getattr(recipe.adapter, "calibration", None)
    paths = [(key, section.train) for split in ("train", "val")
             for key, section in recipe.data.sources(split)]
    paths += [("adapter.calibration.data", getattr(calibration, "data", None))]
    if recipe.quant.compensation is not None:
        paths += [("quant.compensation.calibration.data",
                   recipe.quant.compensation.calibration.data)]
    paths += [(f"eval.tasks[{i}].data", task.data) for i, task in enumerate(recipe.eval.tasks)]
    for key, path in paths:
        if path is not None:
            resolve_source(path, key=key)


def check_same_recipe(recipe: Recipe, out: Path) -> None:
    """--resume: the recipe is the run's recipe.yaml but for the keys a resume may change."""
    from peftune.models.facts import inspect_model
    from peftune.recipe import load_recipe

    saved_path = out / "recipe.yaml"
    if not saved_path.is_file():
        raise InputError(f"--resume: {saved_path} is missing; this is not a peftune run directory")
    saved = load_recipe(saved_path, inspect_model=inspect_model).model_dump()
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


def make_output_dir(built: BuiltRun, out: Path, *, resume_from: Path | None) -> None:
    """Once the run is built: room for its weights, then `out` made empty (its previous run
    removed, with --overwrite), or a resumed run's half-written checkpoints removed."""
    save_every = built.recipe.train.save_every
    check_free_space(out, _trainable_bytes(built.model) * (2 if save_every else 1))
    if resume_from is None:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
    else:
        remove_partial_checkpoints(out)


def start_run_dir(built: BuiltRun, out: Path) -> list | None:
    """Before training: the recipe's eval data read (bad eval data stops the run now; its
    tasks are returned), `recipe.yaml` written, and the rows data.select chose kept with the
    run (the run says what it trained on)."""
    from peftune.evaluate.command import prepare_recipe_eval
    from peftune.recipe import recipe_to_yaml

    recipe = built.recipe
    eval_tasks = prepare_recipe_eval(recipe, built.tokenizer, out)
    (out / "recipe.yaml").write_text(_source_comment(recipe.model.path) + recipe_to_yaml(recipe))
    selection = built.data_stats.get("selection")
    if selection is not None:
        _keep_selection(Path(selection["dir"]), out / "selection")
    return eval_tasks


def _trainable_bytes(model) -> int:
    """What one copy of the trained weights takes: a floor for a checkpoint or the export."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _source_comment(model_path: str) -> str:
    """recipe.yaml's first lines for a GGUF or catalogue model: the file and its sha256."""
    from peftune.models.sources import describe_source

    source = describe_source(model_path)
    if source is None:
        return ""
    lines = [f"# model.path {model_path}: " + (f"catalogue model, {source['package']}, "
                                                 if "catalogue" in source else "") + "GGUF file",
             f"#   {source['gguf']}", f"#   sha256 {source['sha256']}",
             f"#   converted to {source['converted']}"]
    return "\n".join(lines) + "\n"


def _keep_selection(cached: Path, into: Path) -> None:
    """The selected rows and the selection's report, hard-linked from the selection cache
    (copied where a link cannot be made): they stay with the run if the cache is cleared."""
    into.mkdir(parents=True, exist_ok=True)
    for name in ("selected.jsonl", "report.json", "select.yaml"):
        source = cached / name
        if not source.is_file():
            continue
        try:
            os.link(source, into / name)
        except OSError:
            shutil.copy2(source, into / name)
