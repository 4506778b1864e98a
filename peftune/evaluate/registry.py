"""Eval tasks by the name a recipe or `--task` uses; each lives in its own module, imported
on first use. A task is an object with three methods:

    prepare(task_cfg, tokenizer, *, key, context) -> Prepared
        read and tokenize the data (no model yet: bad data fails before any model loads);
        Prepared.batches is the batch plan (lists of unit indices), which must depend only
        on the data, so that any number of processes split it the same way
    run_batch(prepared, loaded, batch) -> list[(unit index, record)]
        evaluate one batch on a loaded model; records are plain Python (gathered across ranks)
    summarise(prepared, records) -> (metrics, predictions)
        records by unit index -> {metric: {"value": x, "n": examples}}, one dict per example
"""

from __future__ import annotations

import importlib
from typing import Any

TASKS: dict[str, str] = {
    "perplexity": "peftune.evaluate.perplexity:TASK",
    "choice": "peftune.evaluate.choice:TASK",
    "generate": "peftune.evaluate.generate:TASK",
    "preference": "peftune.evaluate.preference:TASK",
}


def task_names() -> list[str]:
    return list(TASKS)


def get_task(name: str) -> Any:
    module, _, attr = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
