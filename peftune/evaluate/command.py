"""From `peftune eval`'s arguments to `run_eval`: the targets (and what they are compared
with), the eval config, the output directory; and the optional lm-evaluation-harness
bridge. Also the end-of-training hook that runs a recipe's `eval:` block."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from peftune.errors import InputError
from peftune.evaluate.config import load_eval_config, recipe_tasks
from peftune.evaluate.targets import Target, resolve_target, run_base


def eval_command(*, target: str | None, model: str | None, adapter: str | None,
                 quant: str | None, config: Path | None, flags: dict[str, Any],
                 batch_size: int | None, compare: list[str], out: Path | None,
                 overwrite: bool, quiet: bool, lm_eval: str | None) -> dict:
    """Validate everything torch-free, then evaluate."""
    if quant is not None and quant not in ("none", "nf4", "fp4", "int8", "int4"):
        raise InputError(f"--quant {quant}: must be one of none, nf4, fp4, int8, int4")
    primary = resolve_target(target, model=model, adapter=adapter, quant=quant)
    targets = [primary]
    for other in compare:
        if other == "base":
            targets.append(run_base(primary))
        else:
            targets.append(resolve_target(other, flag="--compare"))
    if lm_eval is not None and importlib.util.find_spec("lm_eval") is None:
        print("lm-eval: skipped (lm-evaluation-harness is not installed: pip install lm-eval)")
        lm_eval = None
        if config is None and flags.get("task") is None:
            return {}
    if primary.run is not None and config is None and flags.get("task") is not None \
            and flags.get("format") is None:
        flags = {**flags, **_run_data_format(primary.run, flags["task"])}
    wants_tasks = config is not None or flags.get("task") is not None
    if not wants_tasks and lm_eval is not None:
        section = None
    else:
        section = load_eval_config(config, flags, batch_size=batch_size)
        section = _preference_beta(primary, section)
    if out is None:
        out = (primary.run / "eval") if primary.run is not None else Path("runs/eval") / primary.label
    try:
        if lm_eval is not None and section is None:
            from peftune.evaluate.report import check_out_dir

            check_out_dir(out, overwrite=overwrite)
            return run_lm_eval(targets, lm_eval, out=out)
        from peftune.evaluate.runner import run_eval

        report = run_eval(targets=targets, config=section, out=out, overwrite=overwrite,
                          quiet=quiet)
        if lm_eval is not None:
            report["lm_eval"] = run_lm_eval(targets, lm_eval, out=out)
    except KeyboardInterrupt as stop:  # Ctrl-C: the CLI's one line names the output directory
        stop.out = out
        raise
    return report


_DATA_KEYS = ("format", "text_field", "prompt_field", "input_field", "response_field",
              "messages_field", "chosen_field", "rejected_field", "roles", "prompt_template",
              "add_eos", "truncation")


def _run_data_format(run: Path, task: str) -> dict[str, Any]:
    """A run's data format and field names (those the task reads), which `--task` uses unless
    `--format` is given: the data evaluated is usually shaped like the data trained on. Task
    preference reads a preference run's pairs so; the other tasks read text, instruction or
    chat rows, and nothing of a preference run's."""
    from peftune.recipe.schema import EVAL_TASK_KEYS

    data = _run_recipe(run).data
    if (task == "preference") != (data.format == "preference") or data.format == "kto":
        return {}
    fields = type(data).model_fields
    return {key: getattr(data, key) for key in _DATA_KEYS
            if key in EVAL_TASK_KEYS.get(task, ())
            and (key == "format" or getattr(data, key) != fields[key].default)}


def _preference_beta(primary: Target, section: Any) -> Any:
    """The eval section with each preference task's β where none is given: the β the run's
    objective trained its rewards with, else 0.1."""
    from peftune.evaluate.config import preference_beta

    if not any(task.task == "preference" and task.beta is None for task in section.tasks):
        return section
    objective = _run_recipe(primary.run).train.objective if primary.run is not None else None
    tasks = [task.model_copy(update={"beta": preference_beta(objective)})
             if task.task == "preference" and task.beta is None else task
             for task in section.tasks]
    return section.model_copy(update={"tasks": tasks})


def _run_recipe(run: Path) -> Any:
    from peftune.models.facts import inspect_model
    from peftune.recipe import load_recipe

    return load_recipe(run / "recipe.yaml", inspect_model=inspect_model)


def run_lm_eval(targets: list[Target], tasks: str, *, out: Path) -> dict:
    """lm-evaluation-harness on each target's in-process model (HFLM over the loaded model),
    offline: `tasks` are harness task names or local task YAML files/directories."""
    import json

    import lm_eval  # noqa: F401 - checked by the caller
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from peftune.dist import Ranks
    from peftune.evaluate.targets import load_target

    names, paths = [], []
    for task in (t.strip() for t in tasks.split(",") if t.strip()):
        (paths if Path(task).exists() else names).append(task)
    manager = TaskManager(include_path=paths or None)
    results = {}
    for target in targets:
        loaded = load_target(target, device=Ranks().device())
        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer)
        chosen = names + [Path(p).stem for p in paths if Path(p).is_file()]
        output = simple_evaluate(model=lm, tasks=chosen, task_manager=manager)
        results[target.label] = output["results"] if output else {}
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_eval.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


def prepare_recipe_eval(recipe: Any, tokenizer: Any, out: Path) -> list | None:
    """Before training: the recipe's eval tasks, their data read and tokenized (None when
    the recipe has none), so that bad eval data stops the run before it trains. On bad data
    the run directory, still empty, is removed."""
    if not recipe.eval.tasks:
        return None
    from peftune.evaluate.registry import get_task
    from peftune.evaluate.runner import context_length

    try:
        tasks = recipe_tasks(recipe)
        context = context_length(Target(label="", model=recipe.model))
        for i, task in enumerate(tasks):
            sized = task.model_copy(update={"batch_size": task.batch_size or recipe.eval.batch_size})
            get_task(task.task).prepare(sized, tokenizer, key=f"eval.tasks[{i}].data",
                                        context=context)
    except InputError:
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return tasks


def eval_after_training(recipe: Any, tasks: list, *, out: Path, model: Any, tokenizer: Any,
                        quiet: bool) -> dict:
    """After training: the recipe's eval tasks on the trained model in memory, into
    `out`/eval; returns each task's metric values for summary.json."""
    from peftune.evaluate.runner import run_eval
    from peftune.evaluate.targets import Loaded

    target = Target(label=out.name, model=recipe.model, quant=recipe.quant, run=out,
                    method=recipe.adapter.method)
    was_training = model.training
    model.eval()
    try:
        report = run_eval(targets=[target], config=recipe.eval, tasks=tasks, out=out / "eval",
                          overwrite=True, quiet=quiet, loaded=Loaded.of(model, tokenizer),
                          keys=[f"eval.tasks[{i}].data" for i in range(len(tasks))])
    finally:
        model.train(was_training)
    return {task: {name: m["value"] for name, m in result["metrics"].items()}
            for task, result in report["models"][0]["tasks"].items()}
