"""Recipe configs of the methods that train the base's own weights (torch-free): `full`
(every parameter) and `freeze` (partial fine-tuning). Applied by
`peftune.adapters.full.model`; both export `model/` instead of an adapter.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Literal

from pydantic import Field, model_validator

from peftune.adapters.registry import MethodConfig, MethodSpec, register


class FullConfig(MethodConfig):
    """Full fine-tuning: every parameter of the base model trains (no adapter)."""

    method: Literal["full"] = "full"

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        return model["total"]


class FreezeConfig(MethodConfig):
    """Partial fine-tuning (freeze the rest): only the last `layers` decoder layers, and/or
    the parameters whose names match one of `modules` (shell-style patterns such as
    `model.layers.*.mlp.*`), and optionally the input `embeddings` and the output `head`
    train. A tied head trains with the embeddings. Exports `model/` like `full`."""

    method: Literal["freeze"] = "freeze"
    layers: int | None = Field(default=None, gt=0)
    modules: list[str] | None = None
    embeddings: bool = False
    head: bool = False

    @model_validator(mode="after")
    def _something_trains(self) -> FreezeConfig:
        if self.layers is None and not self.modules and not self.embeddings and not self.head:
            raise ValueError("adapter.method freeze trains nothing: set adapter.layers (the "
                             "last N decoder layers), adapter.modules, adapter.embeddings "
                             "or adapter.head")
        return self

    def trains(self, name: str, layer: int | None, num_layers: int) -> bool:
        """Whether parameter `name` (in decoder layer `layer`, if any) trains."""
        if self.layers is not None and layer is not None and layer >= num_layers - self.layers:
            return True
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.modules or [])

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        if self.layers is not None and self.layers > model["layers"]:
            return None
        trained: set[str] = set()
        embedding = next(m.name for m in model["modules"] if m.name.endswith("embed_tokens"))
        for module in model["modules"]:
            index = model["layer_of"](module.name)
            if (self.trains(f"{module.name}.weight", index, model["layers"])
                    or (self.embeddings and module.name == embedding)
                    or (self.head and module.name == "lm_head")):
                # a tied head is the embedding's tensor: it trains, and counts, once
                trained.add(embedding if module.tied else module.name)
        return sum(m.weight + m.bias for m in model["modules"] if m.name in trained)


register(MethodSpec(
    name="full",
    config=FullConfig,
    apply="peftune.adapters.full.model:apply_full",
    description="full fine-tuning: every base parameter trains; exports model/",
    paper="-",
    mergeable=True,
    exports_plain_lora=False,
    trains_base_weights=True,
))

register(MethodSpec(
    name="freeze",
    config=FreezeConfig,
    apply="peftune.adapters.full.model:apply_freeze",
    description="partial fine-tuning: only the last N layers / named parameters train",
    paper="-",
    mergeable=True,
    exports_plain_lora=False,
    trains_base_weights=True,
))
