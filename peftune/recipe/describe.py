"""`peftune validate`'s report: the resolved recipe and the numbers it implies.

Users pick batch size, accumulation and rank by the numbers they produce (sequences and
tokens per optimizer step, trainable parameters), so validate prints them before any
model is loaded. The parameter count is analytic, from the local model's config.json,
because loading the model would import torch and take seconds to minutes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftune.recipe.loader import recipe_to_yaml
from peftune.recipe.schema import Recipe

# Decoder-only architectures whose module layout `_modules` knows; the rest are counted
# by the training run once the model is built.
COUNTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def describe_recipe(recipe: Recipe, *, console: Any = None) -> None:
    """Print the fully resolved recipe as YAML, then the derived training numbers."""
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
    for name, value in derived_numbers(recipe).items():
        table.add_row(name, value)
    console.print(table)


def derived_numbers(recipe: Recipe) -> dict[str, str]:
    """The derived numbers as (label -> text), in print order; one process assumed (validate
    does not know how many `accelerate launch` will start, so the per-process numbers are
    multiplied by it at train start)."""
    train, data = recipe.train, recipe.data
    processes = 1
    sequences = train.batch_size * train.grad_accum * processes
    tokens = sequences * data.max_length
    fill = ("packed sequences are full, so close to this" if data.packing
            else "unpacked rows are usually shorter")
    return {
        "sequences per optimizer step": f"{sequences:,} (batch_size {train.batch_size} × "
                                        f"grad_accum {train.grad_accum} × {processes} process)",
        "tokens per optimizer step": f"at most {tokens:,} ({sequences:,} × max_length "
                                     f"{data.max_length}; {fill})",
        "gradient accumulation": f"{train.grad_accum} micro-batch{'es' if train.grad_accum > 1 else ''}"
                                 f" of {train.batch_size} per optimizer step",
        "learning rate": _schedule_summary(recipe),
        "trainable parameters": _trainable_summary(recipe),
    }


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


def _trainable_summary(recipe: Recipe) -> str:
    config_file = Path(recipe.model.path).expanduser() / "config.json"
    if not config_file.is_file():
        return "computed at train start (model.path is not a local model directory)"
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
        return f"0 of {total:,}: adapter.target_modules matches no layer of this model"
    return f"{trainable:,} ({trainable / total:.2%} of the base model's {total:,})"


@dataclass(frozen=True)
class _Module:
    """One parametrised module of the model, named as transformers names it."""

    name: str
    weight: int
    bias: int = 0
    dims: tuple[int, int] | None = None  # (in, out) of a Linear or Embedding; LoRA-able
    linear: bool = False  # part of `all-linear` (peft excludes the output layer)
    tied: bool = False  # shares its weight with another module (tied lm_head)


def estimate_parameters(config: dict, adapter: Any) -> tuple[int, int] | None:
    """(total base-model parameters, trainable parameters) from a config.json dict, or None
    when the architecture is not one this counts or the method cannot count ahead
    (`MethodConfig.estimate_trainable`; e.g. EVA picks its ranks from data).

    Totals match `sum(p.numel() for p in model.parameters())` (a tied lm_head counted once).
    The method is handed the linear layers it targets, matched as peft matches them:
    `all-linear` is every Linear but lm_head, and a list names modules whose name is, or ends
    with `.` + , one of its entries. `modules_to_save` train a full copy of their module.
    """
    modules = _modules(config)
    if modules is None:
        return None
    total = sum((0 if m.tied else m.weight) + m.bias for m in modules)
    targets = adapter.targets
    if targets is None:
        chosen = []
    elif targets == "all-linear":
        chosen = [m for m in modules if m.linear and m.name != "lm_head"]
    else:
        chosen = [m for m in modules if _matches(m.name, targets)]
    if any(m.dims is None for m in chosen):
        return None  # a norm was targeted: peft refuses it, the run reports that
    if targets is not None and not chosen:
        return total, 0
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    shape = {
        "hidden": hidden, "layers": int(config["num_hidden_layers"]),
        "kv_dim": kv_heads * head_dim, "total": total, "modules": modules,
        "all_biases": sum(m.bias for m in modules), "layer_of": _layer_of,
    }
    trainable = adapter.estimate_trainable(chosen, shape)
    if trainable is None:
        return None
    for m in modules:
        if getattr(adapter, "modules_to_save", None) and _matches(m.name, adapter.modules_to_save):
            trainable += m.weight + m.bias
    return total, trainable


def _layer_of(name: str) -> int | None:
    """The decoder layer a module belongs to (`model.layers.3.mlp` -> 3), or None."""
    parts = name.split(".")
    for before, index in zip(parts, parts[1:], strict=False):
        if before == "layers" and index.isdigit():
            return int(index)
    return None


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _modules(config: dict) -> list[_Module] | None:
    """Llama-style decoder modules with their sizes; None for other architectures."""
    model_type = config.get("model_type")
    if model_type not in COUNTED_ARCHITECTURES:
        return None
    try:
        hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError):
        return None
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    attn_bias = bool(config.get("attention_bias", False))
    qkv_bias = {"llama": attn_bias, "qwen3": attn_bias, "qwen2": True}.get(model_type, False)
    o_bias = {"llama": attn_bias, "qwen3": attn_bias}.get(model_type, False)
    mlp_bias = model_type == "llama" and bool(config.get("mlp_bias", False))

    def linear(name: str, fan_in: int, fan_out: int, bias: bool) -> _Module:
        return _Module(name, fan_in * fan_out, fan_out if bias else 0, (fan_in, fan_out), True)

    modules = [_Module("model.embed_tokens", vocab * hidden, dims=(vocab, hidden))]
    for i in range(layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        modules += [
            linear(f"{attn}.q_proj", hidden, heads * head_dim, qkv_bias),
            linear(f"{attn}.k_proj", hidden, kv_heads * head_dim, qkv_bias),
            linear(f"{attn}.v_proj", hidden, kv_heads * head_dim, qkv_bias),
            linear(f"{attn}.o_proj", heads * head_dim, hidden, o_bias),
            linear(f"{mlp}.gate_proj", hidden, inter, mlp_bias),
            linear(f"{mlp}.up_proj", hidden, inter, mlp_bias),
            linear(f"{mlp}.down_proj", inter, hidden, mlp_bias),
            _Module(f"model.layers.{i}.input_layernorm", hidden),
            _Module(f"model.layers.{i}.post_attention_layernorm", hidden),
        ]
        if model_type == "qwen3":  # RMSNorm over each head's queries and keys
            modules += [_Module(f"{attn}.q_norm", head_dim), _Module(f"{attn}.k_norm", head_dim)]
    tied = bool(config.get("tie_word_embeddings", False))
    modules += [_Module("model.norm", hidden),
                _Module("lm_head", hidden * vocab, dims=(hidden, vocab), linear=True, tied=tied)]
    return modules
