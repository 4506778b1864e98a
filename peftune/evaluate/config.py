"""The eval configuration: an eval YAML (an `eval:` section, the same block a training recipe
takes) and/or command-line flags, validated as one `EvalSection` with every problem reported
at once as `file:line: eval.tasks[0].key: message` (or `--flag: ...`), read as recipes are
(`peftune.recipe.yamlfile`). Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from peftune.errors import InputError
from peftune.recipe.errors import Problem, Where, locate, pydantic_problems, show
from peftune.recipe.schema import EVAL_SHARED_KEYS, EVAL_TASK_KEYS, EvalSection, EvalTask
from peftune.recipe.yamlfile import read_yaml, unique_lines

_FLAGS = 3  # problems sort as: file (0), its parent (1), then flags
DEFAULT_BETA = 0.1  # a preference task's β where no preference objective gives one


def load_eval_config(path: str | Path | None, flags: dict[str, Any] | None = None,
                     *, batch_size: int | None = None) -> EvalSection:
    """The eval section of `path` (if given), with one more task from `flags` (when
    `flags['task']` is set) and `flags`' other task keys applied to every task that reads
    them."""
    if path is not None:
        data, where, problems = read_yaml(path, normalise=_empty_eval_section)
        extra = sorted(set(data) - {"eval"})
        if extra:
            problems.append(Problem(locate((extra[0],), where), (extra[0],),
                                    "an eval file has only an eval: section (tasks:, batch_size:)"))
    else:
        data, where, problems = {}, {(): Where((_FLAGS, -1), "command line")}, []
    section = data.get("eval")
    if section is None:
        section = data["eval"] = {}
        where.setdefault(("eval",), where[()])
    if not isinstance(section, dict):
        raise InputError(f"{locate(('eval',), where).text}: eval: expected a mapping (tasks:, "
                         f"batch_size:), got {show(section)}")
    tasks = section.setdefault("tasks", [])
    where.setdefault(("eval", "tasks"), where[("eval",)])
    if not isinstance(tasks, list):
        raise InputError(f"{locate(('eval', 'tasks'), where).text}: eval.tasks: expected a list "
                         f"of tasks (- task: perplexity ...), got {show(tasks)}")
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != []}
    if "task" in flags:
        where[("eval", "tasks", len(tasks))] = Where((_FLAGS, 0), "--task")
        tasks.append({"task": flags["task"]})
    # With --task, the other task flags describe that task; without, they apply to every
    # task of the file that reads them (--max-examples 50 for a quick look; --max-new-tokens
    # to the generate tasks).
    receivers = [len(tasks) - 1] if "task" in flags else range(len(tasks))
    for number, (key, value) in enumerate(flags.items()):
        at = Where((_FLAGS, number), f"--{key.replace('_', '-')}")
        readers = [i for i in receivers if isinstance(tasks[i], dict)]
        if "task" not in flags and key not in EVAL_SHARED_KEYS:
            readers = [i for i in readers if key in EVAL_TASK_KEYS.get(tasks[i].get("task"), ())]
            if not readers and tasks:
                owners = [task for task, keys in EVAL_TASK_KEYS.items() if key in keys]
                problems.append(Problem(at, ("eval", "tasks", key),
                                        f"no task of {path} reads it; only "
                                        f"{' and '.join(owners)} tasks do"))
        for i in readers:
            tasks[i][key] = value
            where[("eval", "tasks", i, key)] = at
    if batch_size is not None:
        section["batch_size"] = batch_size
        where[("eval", "batch_size")] = Where((_FLAGS, 99), "--batch-size")
    if not tasks:
        problems.append(Problem(locate(("eval", "tasks"), where), ("eval", "tasks"),
                                "no task to run: give --task perplexity|choice|generate|"
                                "preference with --data FILE, or --config FILE with "
                                "eval.tasks"))
    config = validate_section(section, data, where, problems)
    if problems or config is None:
        raise InputError(*unique_lines(problems))
    return config


def _empty_eval_section(data: dict, where: dict) -> None:
    """`eval:` with every key commented out is the section with its defaults, as in a recipe,
    so a file that extends another keeps its parent's tasks."""
    if "eval" in data and data["eval"] is None:
        data["eval"] = {}


def validate_section(section: dict, data: dict, where: dict,
                     problems: list[Problem]) -> EvalSection | None:
    """Validate the section's own keys, then each task (so an unknown key is named with
    the task's valid keys); appends to `problems`."""
    tasks = section.get("tasks", [])
    try:
        EvalSection.model_validate({**section, "tasks": []})
    except ValidationError as err:
        problems += pydantic_problems(err.errors(include_url=False), data, where,
                                      root=EvalSection, prefix=("eval",))
    validated = []
    for i, task in enumerate(tasks if isinstance(tasks, list) else []):
        prefix = ("eval", "tasks", i)
        try:
            validated.append(EvalTask.model_validate(task))
        except ValidationError as err:
            problems += pydantic_problems(err.errors(include_url=False), data, where,
                                          root=EvalTask, prefix=prefix)
            continue
        if validated[-1].data is None:
            problems.append(Problem(locate(prefix, where), prefix + ("data",),
                                    "required: the file to evaluate on (--data FILE)"))
    if problems:
        return None
    try:
        return EvalSection.model_validate({**section, "tasks": validated})
    except ValidationError as err:
        problems += pydantic_problems(err.errors(include_url=False), data, where,
                                      root=EvalSection, prefix=("eval",))
        return None


def recipe_tasks(recipe: Any) -> list[EvalTask]:
    """A training recipe's eval tasks, each reading `data.val` (with the recipe's data keys)
    when it names no file of its own; a preference task's `beta` is the recipe's objective's
    unless it sets one."""
    tasks = []
    # not max_length: a preference task scores whole pairs, up to the model's context
    shared = {key: getattr(recipe.data, key) for key in EvalTask.model_fields
              if key in type(recipe.data).model_fields
              and key not in ("max_examples", "max_length")}
    for i, task in enumerate(recipe.eval.tasks):
        if task.task == "preference" and task.beta is None:
            task = task.model_copy(update={"beta": preference_beta(recipe.train.objective)})
        if task.data is None:
            if recipe.data.val is None:
                raise InputError(f"eval.tasks[{i}].data: required, since the recipe has no "
                                 "data.val to evaluate on")
            inherited = {key: value for key, value in shared.items()
                         if key not in task.model_fields_set and _reads(task.task, key)}
            task = task.model_copy(update={**inherited, "data": recipe.data.val})
        tasks.append(task)
    return tasks


def preference_beta(objective: Any | None) -> float:
    """A preference task's β by default: the β of a run's preference objective (`objective`:
    its train.objective), else DEFAULT_BETA (sft, orpo, no run)."""
    beta = getattr(objective, "beta", None) if getattr(objective, "name", "sft") != "sft" else None
    return DEFAULT_BETA if beta is None else beta


def _reads(task: str, key: str) -> bool:
    from peftune.recipe.schema import EVAL_TASK_KEYS

    return key in EVAL_TASK_KEYS[task] or key == "on_bad_row"
