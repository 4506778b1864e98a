"""Native adapter directories: what peftune exports for methods whose adapter is not a PEFT
one (bottleneck / Compacter, the sparse methods). `NATIVE_CONFIG` names the method and its
settings, `NATIVE_WEIGHTS` holds the tensors; the method's registration names the loader
that rebuilds the adapter on a plain transformers model (`MethodSpec.native_loader`), so
a directory can never make peftune import code that is not a registered method's.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from peftune.errors import InputError

NATIVE_CONFIG = "peftune_adapter.json"  # names the method and its settings
NATIVE_WEIGHTS = "peftune_adapter.safetensors"


def read_native_config(adapter_dir: str | Path) -> dict | None:
    """A native adapter directory's config (method, settings), or None when it is not one."""
    path = Path(adapter_dir) / NATIVE_CONFIG
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read it: {err}") from None


def is_native_adapter(adapter_dir: str | Path) -> bool:
    return (Path(adapter_dir) / NATIVE_CONFIG).is_file()


def load_native_adapter(model: Any, adapter_dir: str | Path, *, trainable: bool = False) -> Any:
    """Rebuild the native adapter in `adapter_dir` on `model` (the plain base it was trained
    on) with the loader its method registered; returns the model with the adapter."""
    from peftune.adapters.registry import get_method, method_names

    described = read_native_config(adapter_dir)
    if described is None:
        raise InputError(f"{adapter_dir}: no {NATIVE_CONFIG}, so not a native peftune adapter "
                         "directory (a run's adapter/)")
    method = described.get("method")
    if method not in method_names() or get_method(method).native_loader is None:
        raise InputError(f"{adapter_dir}/{NATIVE_CONFIG}: method {method!r} has no native "
                         "adapter this peftune can load")
    module, _, func = get_method(method).native_loader.partition(":")
    return getattr(importlib.import_module(module), func)(model, adapter_dir, trainable=trainable)
