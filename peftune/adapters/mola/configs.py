"""Recipe config of MoLA (torch-free); the layer and its export: `model.py`."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from peftune.adapters.registry import BNB_4BIT, INT4, INT8, MethodSpec, register
from peftune.adapters.targets import TargetedConfig


class MolaConfig(TargetedConfig):
    """MoLA (Gao et al. 2024, "Higher Layers Need More LoRA Experts", arXiv:2402.08562): each
    targeted linear layer of decoder layer l gets E_l LoRA experts (A_e Kaiming, B_e zero)
    and a router R (E_l x in). For a token x the router's softmax p = softmax(R·x) keeps its
    `top_k` largest entries, renormalised to sum to 1 (gates g), and
    y = W·x + (alpha/r)·Σ_e g_e·B_e·A_e·x. The experts per layer follow `schedule`:
    `increasing` (the paper's recommendation, its MoLA-▽: the layers in four equal groups
    with experts·1/4, 2/4, 3/4 and 4/4 experts, at least one), `uniform` (`experts` in every
    layer), or a list in `experts` with one count per decoder layer. With
    `router_aux_loss` > 0, the load-balancing loss of Switch Transformers,
    E·Σ_e f_e·P_e (f_e the fraction of token slots routed to expert e, P_e its mean router
    probability, over every token of the micro-batch) times that coefficient, averaged over
    the layers, is added to the loss. The router depends on the input, so the adapter does
    not merge into the weights: it is exported as a native adapter that `peftune eval` and
    `peftune chat` load. The paper reports MoLA equal or better than its baselines on six
    benchmarks, with more experts in higher layers better than the same number spread
    evenly."""

    method: Literal["mola"] = "mola"
    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    experts: int | list[int] = Field(default=8, description="experts in the top layers (a "
                                     "number), or one count per decoder layer (a list)")
    schedule: Literal["increasing", "uniform"] = "increasing"
    top_k: int = Field(default=2, gt=0)
    router_aux_loss: float = Field(default=0.0, ge=0.0)

    rank_key: ClassVar[str | None] = "r"

    @model_validator(mode="after")
    def _counts(self) -> MolaConfig:
        counts = self.experts if isinstance(self.experts, list) else [self.experts]
        if not counts or any(not isinstance(c, int) or c < 1 for c in counts):
            raise ValueError(f"adapter.experts: {self.experts} is not a positive number of "
                             "experts, or a list of them (one per decoder layer)")
        if isinstance(self.experts, int) and self.top_k > self.experts:
            raise ValueError(f"adapter.top_k ({self.top_k}) is more than adapter.experts "
                             f"({self.experts}); route to at most as many experts as there are")
        return self

    def scaling(self) -> float:
        return self.alpha / self.r

    def experts_per_layer(self, num_layers: int) -> list[int]:
        """E_l for each of `num_layers` decoder layers (a list's length is checked by the
        caller against the model)."""
        if isinstance(self.experts, list):
            return list(self.experts)
        if self.schedule == "uniform":
            return [self.experts] * num_layers
        group = [min(4 * layer // num_layers, 3) for layer in range(num_layers)]
        return [max(1, math.ceil(self.experts * (g + 1) / 4)) for g in group]

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        if isinstance(self.experts, list) and len(self.experts) != model["layers"]:
            return None
        counts = self.experts_per_layer(model["layers"])
        total = 0
        for layer in layers:
            index = model["layer_of"](layer.name)
            if index is None:
                return None
            fan_in, fan_out = layer.dims
            total += counts[index] * (self.r * (fan_in + fan_out) + fan_in)
        return total


register(MethodSpec(
    name="mola", config=MolaConfig, apply="peftune.adapters.mola.model:apply_mola",
    description="LoRA experts per layer mixed by a top-k token router; more in higher layers",
    paper="Gao et al. 2024, arXiv:2402.08562 (MoLA)", mergeable=False,
    exports_plain_lora=False, quantized=BNB_4BIT | INT8 | INT4,
    native_loader="peftune.adapters.mola.model:load_mola"))
