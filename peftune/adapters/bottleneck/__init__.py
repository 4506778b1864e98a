"""Bottleneck adapters and Compacter: small modules beside the frozen base, on the attention
and / or MLP sub-blocks of every decoder layer.

  configs   the recipe configs and their registration (torch-free)
  model     the adapter modules, `apply_bottleneck`, the native export and its loader

Importing this package is torch-free; `load_bottleneck` imports the model when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_bottleneck(model: Any, adapter_dir: str | Path, *, trainable: bool = False) -> Any:
    """Rebuild an exported bottleneck / Compacter adapter on `model` (a plain transformers
    model of the base it was trained on) and return the model: the name a native adapter's
    `peftune_adapter.json` gives (see `peftune.adapters.bottleneck.model.load_bottleneck`)."""
    from peftune.adapters.bottleneck.model import load_bottleneck as load

    return load(model, adapter_dir, trainable=trainable)
