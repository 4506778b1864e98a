"""A sparse adapter on disk: the native export, its loader, the exact merge, and the
resumable checkpoint state.

The export is a native adapter directory (`peftune.adapters.native`): `peftune_adapter.json`
(method, settings, base, each module's weight shape) and `peftune_adapter.safetensors`
with, per targeted module, `NAME.indices` (sorted flat row-major indices into its weight,
int32 when the weight has fewer than 2³¹ entries) and `NAME.values` (fp32 deltas); PaCA
adds `NAME.columns`, DSEE the low-rank path as `NAME.lora_A` / `NAME.lora_B` (scaling
folded into B). `load_sparse` rebuilds it on a plain transformers model of the base, and
gives the model peft's `merge_and_unload()` (W + ΔW exactly, the wrappers removed) and
`get_base_model()`, so `peftune merge` and the method matrix treat it like a PEFT model.
DSEE's `prune_density` is applied when the adapter is loaded: the model it gives is the
pruned merged model.

A checkpoint holds every layer's indices, deltas, LT-SFT's dense D (empty once freed) and
which phase it is in, SpIEL's candidates and their gradient sums, DSEE's factors, and the
hooks' step: what `--resume` needs to end bitwise equal.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftune.adapters.native import NATIVE_CONFIG, NATIVE_WEIGHTS, read_native_config
from peftune.adapters.sparse.configs import SparseConfig, entry_count
from peftune.adapters.sparse.layer import SparseDeltaLinear, sparse_layers
from peftune.errors import InputError

APPLY = "peftune.adapters.sparse.model:apply_sparse"


def export_sparse(model: Any, out_dir: str | Path, tokenizer: Any = None, *,
                  config: SparseConfig) -> None:
    from safetensors.torch import save_file

    tensors, modules = {}, {}
    for name, layer in sparse_layers(model).items():
        indices, values = exported_entries(layer)
        small = layer.numel < 2 ** 31
        tensors[f"{name}.indices"] = indices.to(torch.int32 if small else torch.int64).cpu()
        tensors[f"{name}.values"] = values.detach().float().cpu().contiguous()
        if layer.sparse_columns is not None and layer.sparse_active:
            tensors[f"{name}.columns"] = layer.sparse_columns.to(torch.int32).cpu()
        if hasattr(layer.base_layer, "export_factors"):
            b_mat, a_mat = layer.base_layer.export_factors()
            tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = a_mat, b_mat
        modules[name] = [layer.out_features, layer.in_features]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / NATIVE_WEIGHTS), metadata={"format": "pt"})
    described = {
        "format": "peftune-native-adapter", "version": 1, "method": config.method,
        "settings": config.model_dump(mode="json"),
        "base_model_name_or_path": model.config.name_or_path or None,
        "modules": modules,
        "entries": sum(int(tensors[f"{name}.values"].numel()) for name in modules),
        "load_with": "peftune.adapters.native.load_native_adapter(model, adapter_dir)",
    }
    (out / NATIVE_CONFIG).write_text(json.dumps(described, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def exported_entries(layer: SparseDeltaLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of the layer's whole sparse change: its deltas, or, in LT-SFT's
    dense phase (a run stopped early), every non-zero entry of D."""
    if layer.sparse_active:
        return layer.sparse_indices, layer.sparse_values
    flat = layer.dense_delta.detach().reshape(-1)
    indices = flat.nonzero().flatten()
    return indices, flat[indices]


# ---- loading and merging ---------------------------------------------------------------------

def load_sparse(model: Any, adapter_dir: str | Path, *, trainable: bool = False) -> Any:
    """Rebuild an exported sparse adapter on `model` (a plain transformers model of the base
    it was trained on) and return the model (see the module docstring)."""
    from safetensors.torch import load_file

    from peftune.adapters.lowrank.layer import LowRankLinear
    from peftune.adapters.registry import get_method, method_names

    described = read_native_config(adapter_dir)
    method = (described or {}).get("method")
    if method not in method_names() or get_method(method).apply != APPLY:
        raise InputError(f"{adapter_dir}: not a sparse adapter directory (no {NATIVE_CONFIG} "
                         "naming paca, fish, lt-sft, spiel or dsee)")
    config = get_method(method).config.model_validate(described["settings"])
    device = next(model.parameters()).device
    state = load_file(str(Path(adapter_dir) / NATIVE_WEIGHTS), device=str(device))
    trained_on = described.get("base_model_name_or_path")
    for name, (out_features, in_features) in described["modules"].items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise InputError(f"{adapter_dir} does not match this model: it has no module {name} "
                             f"(the adapter was trained on {trained_on})") from None
        if (getattr(base, "out_features", None), getattr(base, "in_features", None)) != \
                (out_features, in_features):
            raise InputError(f"{adapter_dir} does not match this model: {name} is "
                             f"{getattr(base, 'out_features', '?')} x "
                             f"{getattr(base, 'in_features', '?')} here but {out_features} x "
                             f"{in_features} in the adapter (trained on {trained_on})")
        if f"{name}.lora_A" in state:  # DSEE: the low-rank path, scaling 1 (folded into B)
            a_mat, b_mat = state[f"{name}.lora_A"], state[f"{name}.lora_B"]
            base = LowRankLinear(base, rank=int(a_mat.shape[0]), scaling=1.0)
            with torch.no_grad():
                base.lora_A.copy_(a_mat)
                base.lora_B.copy_(b_mat)
        columns = state.get(f"{name}.columns")
        layer = SparseDeltaLinear(base, state[f"{name}.indices"].long(),
                                  columns=None if columns is None else columns.long())
        with torch.no_grad():
            layer.sparse_values.copy_(state[f"{name}.values"])
        layer.requires_grad_(False)
        for param in (layer.sparse_values, getattr(base, "lora_A", None), getattr(base, "lora_B", None)):
            if param is not None:
                param.requires_grad_(trainable)
        _replace(model, name, layer)
    prune = getattr(config, "prune_density", None)
    if prune is not None:
        merge_and_unload(model, prune_density=prune)
    model.merge_and_unload = partial(merge_and_unload, model)
    model.get_base_model = lambda: model
    return model


def merge_and_unload(model: Any, *, prune_density: float | None = None) -> Any:
    """Fold every sparse layer into its base weight, W' = W + ΔW in fp32 (then the weight's
    dtype), keeping only the `prune_density` largest entries of W' when given (DSEE), and put
    the plain linear back in its place; returns the model."""
    for name, layer in sparse_layers(model).items():
        linear = layer.linear()
        with torch.no_grad():
            weight = layer.merged_weight()
            if prune_density is not None:
                weight = prune_by_magnitude(weight, prune_density)
            linear.weight.data = weight.to(linear.weight.dtype)
        _replace(model, name, linear)
    return model


def prune_by_magnitude(weight: torch.Tensor, density: float) -> torch.Tensor:
    """`weight` with all but its `density` largest-magnitude entries set to zero."""
    keep = entry_count(density, weight.numel())
    flat = weight.reshape(-1)
    pruned = torch.zeros_like(flat)
    top = torch.topk(flat.abs(), keep, sorted=False).indices
    pruned[top] = flat[top]
    return pruned.view_as(weight)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# ---- checkpoint state ------------------------------------------------------------------------

def _tensors(layer: SparseDeltaLinear) -> dict[str, torch.Tensor]:
    found = {"sparse_indices": layer.sparse_indices, "sparse_values": layer.sparse_values}
    if layer.dense_delta is not None:
        found["dense_delta"] = layer.dense_delta
    if layer.probe_indices is not None:
        found["probe_indices"] = layer.probe_indices
        found["probe_grad_sum"] = layer.probe_grad_sum
    for factor in ("lora_A", "lora_B"):
        if isinstance(getattr(layer.base_layer, factor, None), nn.Parameter):
            found[f"base_layer.{factor}"] = getattr(layer.base_layer, factor)
    return found


def sparse_state(model: Any, hook_state: dict) -> dict:
    state = {"hooks.step": torch.tensor(hook_state["step"])}
    for name, layer in sparse_layers(model).items():
        for key, tensor in _tensors(layer).items():
            state[f"{name}.{key}"] = tensor.detach().to("cpu", copy=True).contiguous()
        state[f"{name}.sparse_active"] = torch.tensor(layer.sparse_active)
    return state


def load_sparse_state(model: Any, state: dict, hook_state: dict) -> None:
    from peftune.adapters.sparse.training_hooks import free_dense

    layers = sparse_layers(model)
    for name, layer in layers.items():  # the candidates the checkpoint holds, if any
        if f"{name}.probe_indices" in state:
            layer.set_probes(state[f"{name}.probe_indices"])
            layer.register_buffer("probe_grad_sum", torch.zeros(
                layer.probe_indices.numel(), device=layer.sparse_values.device))
    expected = set(sparse_state(model, hook_state))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    hook_state["step"] = int(state["hooks.step"])
    for name, layer in layers.items():
        if bool(state[f"{name}.sparse_active"]) and not layer.sparse_active:
            free_dense(layer)  # LT-SFT past its dense phase
        layer.set_indices(state[f"{name}.sparse_indices"], state[f"{name}.sparse_values"])
        with torch.no_grad():
            for key, tensor in _tensors(layer).items():
                if key not in ("sparse_indices", "sparse_values"):
                    tensor.data = state[f"{name}.{key}"].to(tensor.device, tensor.dtype).clone()
