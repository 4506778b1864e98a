"""`peftune eval`: every task on every model (the target, then what it is compared with),
sharded over the processes of a multi-process launch, and one report.

Everything that can be wrong with the input is checked first (paths, the eval config, the
data of every task, read and tokenized with the models' tokenizers); then each model loads
in turn and runs every task; rank 0 writes the report, the predictions and the chart into
the output directory, which appears whole or not at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftune.dist import Ranks
from peftune.evaluate.report import (
    Progress,
    check_out_dir,
    deltas,
    print_table,
    write_outputs,
)
from peftune.evaluate.targets import Loaded, Target, load_target
from peftune.recipe.schema import EvalSection, EvalTask


@dataclass
class _Prepared:
    task: EvalTask
    key: str
    impl: Any
    data: Any


def run_eval(*, targets: list[Target], config: EvalSection, out: Path | None,
             overwrite: bool = False, quiet: bool = False, tasks: list[EvalTask] | None = None,
             loaded: Loaded | None = None, keys: list[str] | None = None) -> dict:
    """Evaluate `targets` (the first is the target, the others are compared with it) on the
    tasks of `config` (or `tasks`, already resolved); returns the report, also written to
    `out`/report.json (no files when `out` is None). `loaded`: the first target's model,
    already in memory (a training run's final model)."""
    from peftune.evaluate.registry import get_task

    ranks = Ranks()
    started = time.perf_counter()
    if out is not None:
        check_out_dir(out, overwrite=overwrite)
    tasks = [t.model_copy(update={"batch_size": t.batch_size or config.batch_size})
             for t in (tasks if tasks is not None else config.tasks)]
    keys = keys or [f"eval.tasks[{i}].data" for i in range(len(tasks))]
    # Data first, with each model's tokenizer: bad data fails before any model loads.
    prepared: dict[int, list[_Prepared]] = {}
    by_tokenizer: dict[tuple, list[_Prepared]] = {}
    for number, target in enumerate(targets):
        tokenizer = loaded.tokenizer if number == 0 and loaded else _tokenizer(target)
        context = context_length(target)
        cache_key = (target.model.path, context) if not (number == 0 and loaded) else ("mem",)
        if cache_key not in by_tokenizer:
            by_tokenizer[cache_key] = [
                _Prepared(task, key, get_task(task.task),
                          get_task(task.task).prepare(task, tokenizer, key=key, context=context))
                for task, key in zip(tasks, keys, strict=True)]
        prepared[number] = by_tokenizer[cache_key]
    prepare_s = time.perf_counter() - started

    models, all_predictions = [], []
    labels = _unique_labels(targets)
    for number, target in enumerate(targets):
        tick = time.perf_counter()
        model = loaded if number == 0 and loaded is not None else \
            load_target(target, device=ranks.device())
        entry = {**target.identity(), "label": labels[number],  # unique, even for equal names
                 "parameters": model.parameters, "dtype": str(_dtype(model.model)),
                 "load_seconds": round(time.perf_counter() - tick, 3), "tasks": {}}
        for item in prepared[number]:
            result, predictions = _run_task(item, model, ranks, quiet=quiet,
                                            title=f"{labels[number]} {item.task.label}")
            entry["tasks"][item.task.label] = result
            all_predictions += [{"model": labels[number], "task": item.task.label, **p}
                                for p in predictions]
        models.append(entry)
        if model is not loaded:
            del model
    report = {
        "models": models,
        "deltas": deltas(models),
        "config": {"batch_size": config.batch_size,
                   "tasks": [t.model_dump(mode="json") for t in tasks]},
        "world_size": ranks.world,
        "timings": {"prepare_seconds": round(prepare_s, 3),
                    "total_seconds": round(time.perf_counter() - started, 3)},
    }
    if ranks.rank == 0:
        if out is not None:
            report["files"] = write_outputs(out, report, all_predictions)
        if not quiet:
            print_table(report, out)
    return report


def _run_task(item: _Prepared, model: Loaded, ranks: Ranks, *, quiet: bool,
              title: str) -> tuple[dict, list]:
    """This rank's batches of one task, gathered into the records of every batch."""
    mine = ranks.mine(item.data.batches)
    tick = time.perf_counter()
    records: dict[int, dict] = {}
    with Progress(title, total=sum(map(len, mine)), enabled=not quiet and ranks.rank == 0) as bar:
        for batch in mine:
            records.update(item.impl.run_batch(item.data, model, batch))
            bar.advance(len(batch))
    seconds = time.perf_counter() - tick
    for part in ranks.gather(records):
        records.update(part)
    seconds = max(ranks.gather(seconds))
    metrics, predictions = item.impl.summarise(item.data, records)
    result = {"metrics": metrics, "examples": item.data.examples,
              "seconds": round(seconds, 3),
              "examples_per_s": round(item.data.examples / seconds, 2) if seconds > 0 else None}
    return result, predictions


def _tokenizer(target: Target) -> Any:
    from peftune.models import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path(target.model.path),
                          trust_remote_code=target.model.trust_remote_code)


def context_length(target: Target) -> int:
    from transformers import AutoConfig

    from peftune.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(target.model.path),
                                        trust_remote_code=target.model.trust_remote_code)
    return int(getattr(config, "max_position_embeddings", None) or 2048)


def _dtype(model: Any) -> Any:
    return next(model.parameters()).dtype


def _unique_labels(targets: list[Target]) -> list[str]:
    labels: list[str] = []
    for target in targets:
        label, n = target.label, 2
        while label in labels:
            label, n = f"{target.label}-{n}", n + 1
        labels.append(label)
    return labels
