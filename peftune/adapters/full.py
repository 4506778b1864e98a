"""Full fine-tuning: every parameter of the base trains; the run exports `model/` in
Hugging Face format (safetensors) instead of an adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftune.adapters.common import load_trainable_state, save_with_tokenizer, trainable_state
from peftune.adapters.hooks import AdapterHooks
from peftune.adapters.specs import FullConfig


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
