"""The parametrised modules of a decoder model, read from its config.json (torch-free).

`peftune validate` counts trainable parameters and checks a method's targets against the
model from this table, before any model is loaded; the training run counts the built model.
Architectures: Llama, Mistral, Qwen2, Qwen3 (the module layout transformers gives them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

COUNTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Module:
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
    modules = model_modules(config)
    if modules is None:
        return None
    total = sum((0 if m.tied else m.weight) + m.bias for m in modules)
    targets = adapter.targets
    chosen = targeted_modules(modules, adapter) or []
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
        "all_biases": sum(m.bias for m in modules), "layer_of": layer_of,
    }
    trainable = adapter.estimate_trainable(chosen, shape)
    if trainable is None:
        return None
    for m in modules:
        if getattr(adapter, "modules_to_save", None) and matches(m.name, adapter.modules_to_save):
            trainable += m.weight + m.bias
    return total, trainable


def layer_of(name: str) -> int | None:
    """The decoder layer a module belongs to (`model.layers.3.mlp` -> 3), or None."""
    parts = name.split(".")
    for before, index in zip(parts, parts[1:], strict=False):
        if before == "layers" and index.isdigit():
            return int(index)
    return None


def matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def model_modules(config: dict) -> list[Module] | None:
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

    def linear(name: str, fan_in: int, fan_out: int, bias: bool) -> Module:
        return Module(name, fan_in * fan_out, fan_out if bias else 0, (fan_in, fan_out), True)

    modules = [Module("model.embed_tokens", vocab * hidden, dims=(vocab, hidden))]
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
            Module(f"model.layers.{i}.input_layernorm", hidden),
            Module(f"model.layers.{i}.post_attention_layernorm", hidden),
        ]
        if model_type == "qwen3":  # RMSNorm over each head's queries and keys
            modules += [Module(f"{attn}.q_norm", head_dim), Module(f"{attn}.k_norm", head_dim)]
    tied = bool(config.get("tie_word_embeddings", False))
    modules += [Module("model.norm", hidden),
                Module("lm_head", hidden * vocab, dims=(hidden, vocab), linear=True, tied=tied)]
    return modules


def strategy_problems(recipe: Any, config: dict | None) -> list[tuple[tuple[str, ...], str]]:
    """`train.strategy` against the model's config.json (None: not on disk): LISA and IST
    cannot keep more decoder layers active (nor IST suppress more) than the model has (the
    run checks the built model too); a GaLore rank not below the hidden size projects
    nothing away."""
    strategy = recipe.train.strategy
    if strategy is None:
        return []
    config = config or {}
    hidden = config.get("hidden_size", config.get("n_embd"))
    if strategy.name == "galore" and isinstance(hidden, int) and strategy.rank >= hidden:
        return [(("train", "strategy", "rank"), f"{strategy.rank} is not below the model's "
                 f"hidden size {hidden}, so GaLore would keep full-size optimizer states; use a "
                 f"rank below {hidden} (e.g. {max(1, hidden // 4)})")]
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    sampled = strategy.name in ("lisa", "ist")  # they draw `layers` decoder layers
    if sampled and isinstance(layers, int) and strategy.layers > layers:
        return [(("train", "strategy", "layers"), f"{strategy.layers} active layers is more than "
                 f"the model's {layers} decoder layers; use at most {layers}")]
    scored = strategy.name == "ist" and strategy.score_layers is not None
    if scored and isinstance(layers, int) and strategy.score_layers > layers:
        return [(("train", "strategy", "score_layers"), f"{strategy.score_layers} suppressed "
                 f"layers is more than the model's {layers} decoder layers; use at most {layers}")]
    return []


def targeted_modules(modules: list[Module], adapter: Any) -> list[Module] | None:
    """The modules `adapter.target_modules` names, as peft matches them (None: no targets)."""
    targets = adapter.targets
    if targets is None:
        return None
    if targets == "all-linear":
        return [m for m in modules if m.linear and m.name != "lm_head"]
    embeddings = getattr(adapter, "targets_embeddings", False)
    return [m for m in modules if matches(m.name, targets) and (m.linear or embeddings)]


def model_problems(recipe: Any, config: dict | None) -> list[tuple[tuple[str, ...], str]]:
    """The adapter's checks against the model's layers, from its config.json (None: not on
    disk): targets that match nothing, a rank above a layer's, block sizes that do not
    divide. Nothing for a model this table does not know (the run checks the built model the
    same way)."""
    context = (config or {}).get("max_position_embeddings")
    if isinstance(context, int) and recipe.data.max_length > context:
        return [(("data", "max_length"), f"{recipe.data.max_length} is more than the model's "
                 f"context of {context} positions (max_position_embeddings); use at most {context}")]
    modules = model_modules(config) if config is not None else None
    chosen = targeted_modules(modules, recipe.adapter) if modules is not None else None
    if chosen is None or any(m.dims is None for m in chosen):
        return []
    if not chosen:
        kinds = sorted({m.name.rsplit(".", 1)[-1] for m in modules if m.linear})
        return [(("adapter", "target_modules"), f"{recipe.adapter.targets} matches no linear "
                 f"layer of the model; its linear layers are: {', '.join(kinds)}")]
    targets = recipe.adapter.targets
    unmatched = [t for t in targets if not any(matches(m.name, [t]) for m in chosen)] \
        if isinstance(targets, list) else []
    if unmatched:  # a typo beside good names would otherwise train the others silently
        kinds = sorted({m.name.rsplit(".", 1)[-1] for m in modules if m.linear})
        return [(("adapter", "target_modules"), f"{', '.join(map(repr, unmatched))} matches no "
                 f"layer of the model; its linear layers are: {', '.join(kinds)}")]
    problem = recipe.adapter.layers_problem({m.name: m.dims for m in chosen})
    return [(("adapter", problem[0]), problem[1])] if problem else []
