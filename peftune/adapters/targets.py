"""Which linear layers a method's `target_modules` names, checked before peft sees them.

peft's own errors for a target that matches nothing, or a rank no layer can hold, come
late and name peft's internals; these checks name the recipe key and the model's layers.
Matching follows peft: `all-linear` is every linear layer but the output head, and a
list entry matches a module whose name is the entry or ends with `.` + the entry.
"""

from __future__ import annotations

from typing import Any

from peftune.errors import InputError


def linear_layers(model: Any) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of every linear layer, quantized ones included."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = {}
    for name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, torch.nn.Linear) or (
                hasattr(module, "in_features") and hasattr(module, "out_features")
                and type(module).__name__.endswith("Linear")):
            layers[name] = (int(module.in_features), int(module.out_features))
    return layers


def targeted_layers(model: Any, targets: str | list[str]) -> dict[str, tuple[int, int]]:
    layers = linear_layers(model)
    if targets == "all-linear":
        return layers
    return {name: dims for name, dims in layers.items()
            if any(name == t or name.endswith("." + t) for t in targets)}


def peft_targets(model: Any, config: Any) -> str | list[str] | None:
    """The `target_modules` to hand peft, after refusing targets that match no linear layer
    and layers the method cannot fit. `all-linear` becomes the names of those layers: peft
    expands it to `nn.Linear` only (missing quantized linears such as HQQ's), and its
    calibration passes (CorDA, LoRA-GA) run before it expands it at all."""
    targets = config.targets
    if targets is None:
        return None
    chosen = targeted_layers(model, targets)
    if not chosen:
        kinds = sorted({name.rsplit(".", 1)[-1] for name in linear_layers(model)})
        raise InputError(f"adapter.target_modules: {targets} matches no linear layer of the "
                         f"model; its linear layers are: {', '.join(kinds)}")
    problem = config.layers_problem(chosen)
    if problem:
        raise InputError(problem)
    if targets == "all-linear":
        return sorted({name.rsplit(".", 1)[-1] for name in chosen})
    return targets
