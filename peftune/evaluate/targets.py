"""What `peftune eval` evaluates: a training run directory (its recipe.yaml names the base
and quantization, and it holds `adapter/` or `model/`), a model directory (a merged model,
or any Hugging Face model), a PEFT adapter directory, or `--model PATH [--adapter DIR]`.

`resolve_target` checks the paths and reads the run's recipe without importing torch, so
bad input fails before any model loads; `load_target` loads the model for evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftune.errors import InputError
from peftune.recipe.schema import ModelSection, QuantSection

_WHAT = ("give a training run directory (with recipe.yaml), a model directory (with "
         "config.json) or a PEFT adapter directory (with adapter_config.json)")


@dataclass
class Target:
    """One model to evaluate: the base (model + quantization) and an optional adapter."""

    label: str
    model: ModelSection
    quant: QuantSection = field(default_factory=QuantSection)
    adapter: Path | None = None
    run: Path | None = None
    method: str | None = None  # the adapter method of a run, from its recipe

    def identity(self) -> dict:
        return {"label": self.label, "run": str(self.run) if self.run else None,
                "model": self.model.path, "quant": self.quant.method,
                "adapter": str(self.adapter) if self.adapter else None, "method": self.method}

    def base(self) -> Target:
        """The same base without the adapter (`--compare base`)."""
        return Target(label="base", model=self.model, quant=self.quant)


def resolve_target(target: str | None, *, model: str | None = None, adapter: str | None = None,
                   quant: str | None = None, flag: str = "TARGET") -> Target:
    """The Target that the command line names; one InputError line for each wrong path."""
    if target is not None and model is not None:
        raise InputError(f"{flag} {target} and --model {model}: give one of them (--adapter "
                         "goes with --model)")
    if target is None and model is None:
        raise InputError(f"nothing to evaluate: {_WHAT}, or --model PATH [--adapter DIR]")
    quant_section = QuantSection(method=quant) if quant is not None else None
    if model is not None:
        resolved = Target(label=_name(model), model=ModelSection(path=_model_dir(model, "--model")),
                          quant=quant_section or QuantSection())
    else:
        resolved = _from_path(target, flag=flag)
        if quant_section is not None:
            resolved.quant = quant_section
    if adapter is not None:
        if resolved.adapter is not None:
            raise InputError(f"--adapter {adapter}: {target} already has an adapter; give "
                             "--model BASE --adapter DIR instead")
        resolved.adapter = _adapter_dir(adapter, "--adapter")
        resolved.label = _name(adapter)
    return resolved


def _from_path(target: str, *, flag: str) -> Target:
    from peftune.models.catalogue import CATALOGUE
    from peftune.models.sources import is_gguf

    path = Path(target).expanduser()
    if is_gguf(target) or (target in CATALOGUE and not path.exists()):  # as --model
        return Target(label=_name(target), model=ModelSection(path=_model_dir(target, flag)))
    if not path.exists():
        raise InputError(f"{flag} {target}: no such directory; {_WHAT}")
    if not path.is_dir():
        raise InputError(f"{flag} {target}: is a file; {_WHAT}")
    if (path / "recipe.yaml").is_file():
        return _from_run(path, target)
    if (path / "config.json").is_file():
        return Target(label=_name(target), model=ModelSection(path=str(path)))
    if _is_adapter(path):
        base = _adapter_base(path)
        if base is None:
            raise InputError(f"{flag} {target}: the adapter does not name its base model "
                             "(base_model_name_or_path); give --model BASE --adapter "
                             f"{target}")
        return Target(label=_name(target), model=ModelSection(path=base), adapter=path)
    raise InputError(f"{flag} {target}: not a run, model or adapter directory; {_WHAT}")


def _from_run(path: Path, shown: str) -> Target:
    from peftune.models.facts import inspect_model
    from peftune.recipe import load_recipe

    recipe = load_recipe(path / "recipe.yaml", inspect_model=inspect_model)
    method = recipe.adapter.method
    if _is_adapter(path / "adapter"):
        if not Path(recipe.model.path).expanduser().exists() and looks_local(recipe.model.path):
            raise InputError(f"{shown}: the run's base model {recipe.model.path} (model.path in "
                             f"{path / 'recipe.yaml'}) does not exist from here; run peftune "
                             "eval from the directory you trained in, or give --model BASE "
                             f"--adapter {path / 'adapter'}")
        return Target(label=_name(shown), model=recipe.model, quant=recipe.quant,
                      adapter=path / "adapter", run=path, method=method)
    if (path / "model" / "config.json").is_file():
        # full / freeze runs: the trained model itself; its base is the recipe's model
        return Target(label=_name(shown), model=ModelSection(path=str(path / "model"),
                                                              dtype=recipe.model.dtype),
                      run=path, method=method)
    raise InputError(f"{shown}: the run has no adapter/ or model/ (did training finish?); "
                     "evaluate a finished run")


def run_base(target: Target) -> Target:
    """The base model of a target for `--compare base`."""
    if target.adapter is not None:
        return target.base()
    if target.run is not None:
        from peftune.models.facts import inspect_model
        from peftune.recipe import load_recipe

        recipe = load_recipe(target.run / "recipe.yaml", inspect_model=inspect_model)
        return Target(label="base", model=recipe.model, quant=recipe.quant)
    raise InputError(f"--compare base: {target.label} is a model without an adapter, so it has "
                     "no base to compare with; give --compare PATH (a model or run directory)")


def _model_dir(model: str, flag: str) -> str:
    from peftune.models.catalogue import looks_like_catalogue_name
    from peftune.models.sources import is_gguf, resolve_model_path

    path = Path(model).expanduser()
    if is_gguf(model) or looks_like_catalogue_name(model):  # converted once, then cached
        return resolve_model_path(model, key=flag)
    if path.is_dir() and (path / "config.json").is_file():
        return str(path)
    if path.is_dir():
        raise InputError(f"{flag} {model}: a directory without config.json; point it at a "
                         "Hugging Face model directory")
    if path.exists() or looks_local(model):
        raise InputError(f"{flag} {model}: no such model directory or .gguf file; give a model "
                         "directory, a .gguf file, a catalogue model (peftune pull lists them) "
                         "or a hub id in the local cache")
    return model  # a hub id: the loader says when it is not in the cache


def _adapter_dir(adapter: str, flag: str) -> Path:
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise InputError(f"{flag} {adapter}: no such directory; point it at a PEFT adapter "
                         "directory (a run's adapter/)")
    if not _is_adapter(path):
        hint = (f"; it is a run directory: pass it as the target, or use {adapter}/adapter"
                if (path / "recipe.yaml").is_file() else "")
        raise InputError(f"{flag} {adapter}: no adapter_config.json, so not a PEFT adapter "
                         f"directory{hint}")
    return path


def _is_adapter(path: Path) -> bool:
    """A PEFT adapter directory, or a native one (bottleneck / Compacter, sparse methods)."""
    from peftune.adapters.native import is_native_adapter

    return (path / "adapter_config.json").is_file() or is_native_adapter(path)


def _adapter_base(path: Path) -> str | None:
    from peftune.adapters.native import read_native_config

    native = read_native_config(path)
    if native is not None:
        return native.get("base_model_name_or_path")
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}/adapter_config.json: cannot read it: {err}") from None
    return config.get("base_model_name_or_path")


def looks_local(path: str) -> bool:
    """A path, not a hub id (`org/name` or `name`, which the loader looks up in the cache)."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1


def _name(path: str) -> str:
    parts = [p for p in Path(path).parts if p not in ("adapter", "model", "/")]
    return parts[-1] if parts else str(path)


# ---------------------------------------------------------------------------------------
# loading


@dataclass
class Loaded:
    """A model ready to evaluate: eval mode, on its device, with its tokenizer and the extra
    inputs its forward needs (Poly and MHR adapters route by `task_ids`: all task 0)."""

    model: Any
    tokenizer: Any
    needs_task_ids: bool = False
    parameters: int = 0

    @classmethod
    def of(cls, model: Any, tokenizer: Any) -> Loaded:
        """A loaded model (with or without an adapter) and its tokenizer."""
        from peftune.adapters.common import count_parameters

        config = getattr(model, "peft_config", {}).get("default")
        needs_task_ids = str(getattr(config, "peft_type", "")).endswith("POLY")
        return cls(model=model, tokenizer=tokenizer, needs_task_ids=needs_task_ids,
                   parameters=count_parameters(model)[1])

    def extra(self, rows: int) -> dict:
        if not self.needs_task_ids:
            return {}
        import torch

        return {"task_ids": torch.zeros(rows, dtype=torch.long,
                                        device=next(self.model.parameters()).device)}


def load_target(target: Target, *, device: Any) -> Loaded:
    """Load the base with `peftune.models.load_model` (quantization, and the bitsandbytes
    CPU fix that keeps 4-bit layers exact), then the adapter with peft."""
    from peftune.models import load_model, load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(target.model.path),
                               trust_remote_code=target.model.trust_remote_code)
    model = load_model(target.model, target.quant, device=device)
    if target.adapter is not None:
        model = _attach_adapter(model, target)
    model.eval()
    return Loaded.of(model, tokenizer)


def _attach_adapter(model: Any, target: Target) -> Any:
    from peft import PeftModel

    from peftune.adapters.native import is_native_adapter, load_native_adapter
    from peftune.models import check_weights_format

    check_weights_format(target.adapter, key="--adapter", weights="adapter",
                         allow_pickle=getattr(target.model, "allow_pickle", False))
    trained_on = _adapter_base(target.adapter)
    try:
        if is_native_adapter(target.adapter):  # not peft's: the method's own loader
            return load_native_adapter(model, target.adapter)
        return PeftModel.from_pretrained(model, str(target.adapter), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line),
                      first[0] if first else type(err).__name__)
        raise InputError(
            f"--adapter {target.adapter} does not match the base model {target.model.path} "
            f"(the adapter was trained on {trained_on}): {detail[:200]}; evaluate it on the "
            "base it was trained on") from None
