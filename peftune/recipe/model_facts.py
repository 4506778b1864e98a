"""What the recipe's checks know of the model `model.path` names, found without loading it:
the directory whose config.json describes it (for the checks against its layers, and the
numbers `peftune validate` prints) and the reasons it cannot be used at all.

Where models come from (GGUF files converted into the cache, the catalogue, the hub cache)
is `peftune.models`' business, not the recipe's: `load_recipe(..., inspect_model=...)` and
`describe_recipe` take a function from the model section to ModelFacts.
`local_model_facts` tells what a model directory on disk says by itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only the annotations: `peftune.models` imports this module
    from peftune.recipe.schema import ModelSection

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class ModelFacts:
    config_dir: Path | None = None  # the directory holding its config.json, when on disk
    problems: tuple[str, ...] = ()  # why model.path cannot be used, one message each


InspectModel = Callable[["ModelSection"], ModelFacts]


def local_model_facts(model: ModelSection) -> ModelFacts:
    """A local model directory: its config.json, and pickle-only weights (refused unless
    model.allow_pickle). Nothing is known here of any other kind of model.path."""
    local = Path(model.path).expanduser()
    if not local.is_dir():
        return ModelFacts()
    problem = pickle_weights_problem(model.path, allow_pickle=model.allow_pickle)
    return ModelFacts(config_dir=local, problems=(problem,) if problem else ())


def pickle_weights_problem(directory: str | Path, *, allow_pickle: bool,
                           weights: str = "model") -> str | None:
    """Why the model or adapter `directory` may not be loaded, or None: its only weights are
    pickle files (`pytorch_model.bin`, ...), which can run code when loaded, and
    `allow_pickle` is off."""
    local = Path(directory).expanduser()
    if allow_pickle or not local.is_dir():
        return None
    try:
        names = [f.name for f in local.iterdir() if f.is_file()]
    except OSError:
        return None  # an unreadable directory: the load itself reports it
    if any(name.endswith(".safetensors") for name in names):
        return None
    pickles = sorted(name for name in names if name.endswith(PICKLE_SUFFIXES))
    if not pickles:
        return None
    return (f"{directory} has {weights} weights only as pickle ({', '.join(pickles[:3])}), "
            "which can run code when loaded; convert them to safetensors, or set "
            "model.allow_pickle: true for files you trust")


def read_model_config(config_dir: Path | None) -> dict | None:
    """The config.json in `config_dir`, or None (no directory, no file, or unreadable)."""
    if config_dir is None:
        return None
    config_file = config_dir / "config.json"
    try:
        return json.loads(config_file.read_text()) if config_file.is_file() else None
    except (OSError, ValueError):
        return None

