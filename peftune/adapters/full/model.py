"""Methods that train the base's own weights: full fine-tuning (every parameter) and
`freeze` (partial fine-tuning: the rest frozen). Both export `model/` in Hugging Face
format (safetensors) instead of an adapter."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

from peftune.adapters.common import (
    decoder_layers,
    load_trainable_state,
    save_with_tokenizer,
    trainable_state,
)
from peftune.adapters.full.configs import FreezeConfig, FullConfig
from peftune.adapters.hooks import AdapterHooks
from peftune.errors import InputError


def apply_full(model: Any, config: FullConfig, **_: Any) -> tuple[Any, AdapterHooks]:
    for param in model.parameters():
        param.requires_grad_(True)
    return model, AdapterHooks(
        export=export_full_model,
        trainable_state=trainable_state,
        load_trainable_state=load_trainable_state,
        artifact="model",
    )


def export_full_model(model: Any, out_dir: Path, tokenizer: Any = None) -> None:
    """A Hugging Face model directory; the KV cache, off while training, is on again."""
    model.config.use_cache = True
    save_with_tokenizer(model, out_dir, tokenizer)


def apply_freeze(model: Any, config: FreezeConfig, **_: Any) -> tuple[Any, AdapterHooks]:
    """Only the last `layers` decoder layers, the parameters matching `modules`, and the
    embeddings / head if asked train; everything else is frozen."""
    blocks = decoder_layers(model)
    if config.layers is not None and config.layers > len(blocks):
        raise InputError(f"adapter.layers: {config.layers} is more than the model's "
                         f"{len(blocks)} decoder layers")
    layer_of = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    # every name of a shared tensor (a tied head is also `lm_head.weight`)
    named = list(model.named_parameters(remove_duplicate=False))
    names = [name for name, _ in named]
    for pattern in config.modules or []:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise InputError(f"adapter.modules: {pattern!r} matches no parameter; names look "
                             f"like {names[len(names) // 2]}")
    for param in model.parameters():
        param.requires_grad_(False)
    for name, param in named:
        if config.trains(name, layer_of.get(id(param)), len(blocks)):
            param.requires_grad_(True)
    if config.embeddings:
        model.get_input_embeddings().weight.requires_grad_(True)
    if config.head:
        model.get_output_embeddings().weight.requires_grad_(True)
    return model, AdapterHooks(
        export=export_full_model,
        trainable_state=trainable_state,
        load_trainable_state=load_trainable_state,
        artifact="model",
    )
