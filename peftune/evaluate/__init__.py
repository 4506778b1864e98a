"""`peftune eval`: perplexity, multiple choice, generation and preference-pair tasks (a
registry keyed by task name, one module each), on a run directory, a model or a base with an
adapter, with comparisons, a report and sharding over processes.

    config = load_eval_config("eval.yaml")
    report = run_eval(targets=[resolve_target("runs/lora")], config=config, out=Path("out"))

Importing this package imports neither torch nor transformers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_eval_config", "resolve_target", "run_eval"]


def __getattr__(name: str) -> Any:
    if name == "run_eval":
        from peftune.evaluate.runner import run_eval

        return run_eval
    if name == "load_eval_config":
        from peftune.evaluate.config import load_eval_config

        return load_eval_config
    if name == "resolve_target":
        from peftune.evaluate.targets import resolve_target

        return resolve_target
    raise AttributeError(name)
