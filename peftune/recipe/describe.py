"""`peftune validate`'s report: the resolved recipe and the numbers it implies.

Users pick batch size, accumulation and rank by the numbers they produce (sequences and
tokens per optimizer step, trainable parameters), so validate prints them before any
model is loaded. The parameter count is analytic, from the local model's config.json,
because loading the model would import torch and take seconds to minutes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftune.recipe.architecture import COUNTED_ARCHITECTURES, estimate_parameters
from peftune.recipe.loader import recipe_to_yaml
from peftune.recipe.model_facts import (
    InspectModel,
    ModelFacts,
    local_model_facts,
    read_model_config,
)
from peftune.recipe.schema import Recipe

__all__ = ["derived_numbers", "describe_recipe", "estimate_parameters"]

def describe_recipe(recipe: Recipe, *, console: Any = None,
                    inspect_model: InspectModel = local_model_facts) -> None:
    """Print the fully resolved recipe as YAML, then the derived training numbers
    (`inspect_model` finds the model's config.json, as for `load_recipe`)."""
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.table import Table

    console = console or Console()
    console.rule("resolved recipe")
    console.print(Syntax(recipe_to_yaml(recipe).rstrip(), "yaml", theme="ansi_dark",
                         background_color="default", word_wrap=True))
    console.rule("derived numbers")
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for name, value in derived_numbers(recipe, inspect_model=inspect_model).items():
        table.add_row(name, value)
    console.print(table)


def derived_numbers(recipe: Recipe, *,
                    inspect_model: InspectModel = local_model_facts) -> dict[str, str]:
    """The derived numbers as (label -> text), in print order; one process assumed (validate
    does not know how many `accelerate launch` will start, so the per-process numbers are
    multiplied by it at train start)."""
    train, data = recipe.train, recipe.data
    model = inspect_model(recipe.model)
    processes = 1
    sequences = train.batch_size * train.grad_accum * processes
    pairs = data.format == "preference"  # a row holds whole pairs: two sides of max_length
    width = data.max_length * (2 if pairs else 1)
    tokens = sequences * width
    fill = ("packed sequences are full, so close to this" if data.packing
            else "unpacked rows are usually shorter")
    row = f"2 × max_length {data.max_length} per row of pairs" if pairs else \
        f"max_length {data.max_length}"
    return {
        ("rows" if pairs else "sequences") + " per optimizer step":
            f"{sequences:,} (batch_size {train.batch_size} × grad_accum {train.grad_accum} × "
            f"{processes} process)" + ("; each row one pair or more" if pairs else ""),
        "tokens per optimizer step": f"at most {tokens:,} ({sequences:,} × {row}; {fill})",
        "gradient accumulation": f"{train.grad_accum} micro-batch{'es' if train.grad_accum > 1 else ''}"
                                 f" of {train.batch_size} per optimizer step",
        "learning rate": _schedule_summary(recipe),
        "trainable parameters": _trainable_summary(recipe, model),
        **({"note": note} if (note := _tied_head_note(recipe, model)) else {}),
    }


def _tied_head_note(recipe: Recipe, model: ModelFacts) -> str | None:
    """What targeting lm_head means when the model ties it to its input embedding."""
    targets = getattr(recipe.adapter, "targets", None)
    if not isinstance(targets, list) or not any(t.split(".")[-1] == "lm_head" for t in targets):
        return None
    config = read_model_config(model.config_dir) or {}
    if not config.get("tie_word_embeddings", False):
        return None
    return ("lm_head is tied to the input embedding (one shared weight): the LoRA adapts the "
            "output projection only; the adapter holds just its factors, and `peftune merge` "
            "writes the head as its own tensor (tie_word_embeddings: false, "
            f"+{config.get('vocab_size', 0) * config.get('hidden_size', 0):,} parameters)")


def _schedule_summary(recipe: Recipe) -> str:
    train = recipe.train
    if train.warmup_steps is not None:
        warmup = f"linear warmup over {train.warmup_steps} steps"
    elif train.warmup_ratio > 0:
        warmup = f"linear warmup over {train.warmup_ratio:.0%} of steps"
        if train.max_steps:
            warmup += f" (≈{train.warmup_for(train.max_steps)})"
    else:
        warmup = "no warmup"
    decay = {"cosine": "cosine decay", "linear": "linear decay", "constant": "constant"}
    length = (f"{train.max_steps:,} steps" if train.max_steps
              else f"{train.epochs:g} epoch{'' if train.epochs == 1 else 's'}, steps counted at train start")
    return f"peak {train.lr:g}, {warmup}, then {decay[train.scheduler]}; {length}"


def _trainable_summary(recipe: Recipe, model: ModelFacts) -> str:
    config_file = (model.config_dir or Path(recipe.model.path).expanduser()) / "config.json"
    if not config_file.is_file():
        return "computed at train start (the model is not on disk, or not converted, yet)"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        return f"computed at train start (cannot read {config_file}: {err})"
    model_type = config.get("model_type", "an unnamed architecture")
    if model_type not in COUNTED_ARCHITECTURES:
        return f"unknown for {model_type} (computed at train start)"
    counted = estimate_parameters(config, recipe.adapter)
    if counted is None:
        return f"computed at train start (not counted ahead for adapter method {recipe.adapter.method})"
    total, trainable = counted
    if trainable == 0:
        what = ("adapter.target_modules matches no layer of this model"
                if recipe.adapter.targets is not None else "the method trains nothing on this model")
        return f"0 of {total:,}: {what}"
    return f"{trainable:,} ({trainable / total:.2%} of the base model's {total:,})"
