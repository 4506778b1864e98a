"""Which layers a method's `target_modules` names, checked before peft sees them, and the
config keys of every method that attaches to named linear layers (`TargetedConfig`).

peft's own errors for a target that matches nothing, or a rank no layer can hold, come
late and name peft's internals; these checks name the recipe key and the model's layers.
Matching follows peft: `all-linear` is every linear layer but the output head, and a
list entry matches a module whose name is the entry or ends with `.` + the entry (the head
and, for LoRA, embedding layers may be listed by name).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import field_validator

from peftune.adapters.registry import MethodConfig
from peftune.errors import InputError


class TargetedConfig(MethodConfig):
    """Keys of every method that attaches to named linear layers."""

    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and value != "all-linear":
            return [value]
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module, or be all-linear")
        return value

    # The recipe key holding the rank that must fit every targeted layer, if any.
    rank_key: ClassVar[str | None] = None

    def layers_problem(self, layers: dict[str, tuple[int, int]]) -> tuple[str, str] | None:
        """Why the targeted `layers` (name -> (fan_in, fan_out)) cannot take this method, as
        (adapter key, message): a rank above the smallest layer's, or a shape the method's
        blocks do not fit. Checked by validate (from config.json) and at train start."""
        if self.rank_key is not None:
            rank = getattr(self, self.rank_key)
            name, (fan_in, fan_out) = min(layers.items(), key=lambda item: min(item[1]))
            if rank > min(fan_in, fan_out):
                return self.rank_key, (f"{rank} is larger than layer {name} ({fan_in} x "
                                       f"{fan_out}) allows; use at most {min(fan_in, fan_out)}")
        for name, (fan_in, fan_out) in layers.items():
            problem = self.divisor_problem(name, fan_in, fan_out)
            if problem:
                return problem
        return None

    def divisor_problem(self, name: str, fan_in: int, fan_out: int) -> tuple[str, str] | None:
        """(key, why) when a layer of this shape does not fit the method's blocks, or None."""
        return None


def linear_layers(model: Any, *, embeddings: bool = False) -> dict[str, tuple[int, int]]:
    """name -> (in, out) of every linear layer (quantized ones included, the head too), and
    of the embedding layers (vocabulary, width) when `embeddings`."""
    import torch

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            if embeddings:
                layers[name] = (int(module.num_embeddings), int(module.embedding_dim))
        elif isinstance(module, torch.nn.Linear) or (
                hasattr(module, "in_features") and hasattr(module, "out_features")
                and type(module).__name__.endswith("Linear")):
            layers[name] = (int(module.in_features), int(module.out_features))
    return layers


def targeted_layers(model: Any, targets: str | list[str], *,
                    embeddings: bool = False) -> dict[str, tuple[int, int]]:
    if targets == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return {name: dims for name, dims in linear_layers(model).items()
                if head is None or model.get_submodule(name) is not head}
    return {name: dims for name, dims in linear_layers(model, embeddings=embeddings).items()
            if _matches(name, targets)}


def unmatched_targets(chosen: Any, targets: str | list[str]) -> list[str]:
    """The entries of a `target_modules` list that match none of the `chosen` layer names."""
    if isinstance(targets, str):
        return []
    return [t for t in targets if not any(_matches(name, [t]) for name in chosen)]


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def peft_targets(model: Any, config: Any) -> str | list[str] | None:
    """The `target_modules` to hand peft, after refusing targets that match no layer,
    `modules_to_save` that match no module, and layers the method cannot fit. `all-linear`
    becomes the names of those layers: peft expands it to `nn.Linear` only (missing
    quantized linears such as HQQ's), and its calibration passes (CorDA, LoRA-GA) run
    before it expands it at all."""
    saved = getattr(config, "modules_to_save", None)
    if saved:
        names = [name for name, _ in model.named_modules()]
        missing = [m for m in saved if not any(n == m or n.endswith("." + m) for n in names)]
        if missing:
            raise InputError(f"adapter.modules_to_save: {missing} matches no module of the "
                             "model; name modules such as lm_head or embed_tokens")
    targets = config.targets
    if targets is None:
        return None
    chosen = targeted_layers(model, targets, embeddings=getattr(config, "targets_embeddings", False))
    kinds = sorted({name.rsplit(".", 1)[-1] for name in linear_layers(model)})
    if not chosen:
        raise InputError(f"adapter.target_modules: {targets} matches no linear layer of the "
                         f"model; its linear layers are: {', '.join(kinds)}")
    unmatched = unmatched_targets(chosen, targets)
    if unmatched:  # a typo beside good names would otherwise train the others silently
        raise InputError(f"adapter.target_modules: {', '.join(map(repr, unmatched))} matches no "
                         f"layer of the model; its linear layers are: {', '.join(kinds)}")
    problem = config.layers_problem(chosen)
    if problem:
        raise InputError(f"adapter.{problem[0]}: {problem[1]}")
    if targets == "all-linear":
        return sorted({name.rsplit(".", 1)[-1] for name in chosen})
    return targets
