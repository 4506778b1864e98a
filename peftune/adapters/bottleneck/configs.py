"""Recipe configs of the bottleneck adapters (torch-free): `bottleneck` (series / parallel
adapters, Houlsby et al. 2019; He et al. 2022; LLM-Adapters, Hu et al. 2023) and
`compacter` (Mahabadi et al. 2021), implemented in `peftune.adapters.bottleneck.model`.

Both add small modules beside the frozen base (nothing of it changes), so they train over
any bitsandbytes base and are not mergeable: the nonlinearity between the down- and the
up-projection has no weight-space equivalent. They export a native adapter directory
(`NATIVE_CONFIG` + `NATIVE_WEIGHTS`) that `peftune.adapters.bottleneck.load_bottleneck`
rebuilds on a plain transformers model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from peftune.adapters.native import (  # noqa: F401  (where bottleneck.model and tests look)
    NATIVE_CONFIG,
    NATIVE_WEIGHTS,
    read_native_config,
)
from peftune.adapters.registry import BNB_4BIT, INT4, INT8, MethodConfig, MethodSpec, register

SUBLAYERS = ("attn", "mlp")
DEFAULT_REDUCTION = 16


class BottleneckConfig(MethodConfig):
    """Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for
    NLP", arXiv:1902.00751; parallel form: He et al. 2022, "Towards a Unified View of
    Parameter-Efficient Transfer Learning", arXiv:2110.04366; for LLMs: Hu et al. 2023,
    LLM-Adapters, arXiv:2304.01933). On each decoder layer's attention and/or MLP sub-block
    f (`sublayers`), with a(z) = scaling·(W_up·σ(W_down·z + b_down) + b_up):

    - `placement: series`: f(x) + a(f(x)) (the adapter after the sub-block's output);
    - `placement: parallel`: f(x) + a(x) (beside it, on the sub-block's input).

    W_down (m x d) starts as nn.Linear's default, W_up (d x m) and b_up at zero, so the
    model starts exactly equal to the base. m = `bottleneck_size`, or hidden size //
    `reduction_factor` (16 when neither is given). `nonlinearity` σ: relu, gelu, silu or
    tanh. The default sub-block is the MLP only, where LLM-Adapters found both forms best.
    """

    method: Literal["bottleneck"] = "bottleneck"
    placement: Literal["series", "parallel"] = "series"
    sublayers: list[Literal["attn", "mlp"]] = Field(default_factory=lambda: ["mlp"])
    reduction_factor: int | None = Field(default=None, gt=0)
    bottleneck_size: int | None = Field(default=None, gt=0)
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    scaling: float = 1.0

    kronecker: ClassVar[bool] = False

    @field_validator("sublayers")
    @classmethod
    def _sublayers(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("adapter.sublayers is empty: name attn, mlp or both")
        if len(set(value)) != len(value):
            raise ValueError(f"adapter.sublayers names a sub-block twice: {value}")
        return value

    @model_validator(mode="after")
    def _one_size(self) -> BottleneckConfig:
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            raise ValueError(f"give one of adapter.reduction_factor ({self.reduction_factor}) "
                             f"and adapter.bottleneck_size ({self.bottleneck_size}), not both")
        return self

    def size_for(self, hidden: int) -> int:
        """The bottleneck width m on a model of hidden size `hidden`."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return hidden // (self.reduction_factor or DEFAULT_REDUCTION)

    def size_problem(self, hidden: int) -> tuple[str, str] | None:
        """(key, message) when the bottleneck cannot be built on hidden size `hidden`."""
        size = self.size_for(hidden)
        key = "bottleneck_size" if self.bottleneck_size is not None else "reduction_factor"
        if size < 1:
            factor = self.reduction_factor or DEFAULT_REDUCTION
            return key, (f"reduction factor {factor} leaves no bottleneck on hidden size "
                         f"{hidden}; use at most {hidden} or set adapter.bottleneck_size")
        return None

    def recipe_problems(self, recipe: Any) -> list[tuple[tuple[str, ...], str]]:
        hidden = _hidden_size(recipe.model.path)
        problem = self.size_problem(hidden) if hidden else None
        return [(("adapter", problem[0]), problem[1])] if problem else []

    def count(self, hidden: int, layers: int) -> int:
        """Trained parameters: per adapter W_down, b_down, W_up, b_up."""
        size = self.size_for(hidden)
        return layers * len(self.sublayers) * (2 * hidden * size + size + hidden)

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        return self.count(model["hidden"], model["layers"])


class CompacterConfig(BottleneckConfig):
    """Compacter (Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter
    Layers", arXiv:2106.04647): the bottleneck adapter with each projection a PHM layer,
    W = Σ_{i=1..n} A_i ⊗ B_i (n = `phm_dim`). The "slow" A_i (n x n) are one set shared by
    every projection of every adapter (down and up alike, the simplest reading of the
    paper's sharing); each projection's B_i are rank one, B_i = s_i·t_iᵀ (s_i of out/n,
    t_i of in/n), so a projection costs in + out parameters plus its bias. n must divide
    the hidden size and the bottleneck size. The up-projection's t_i start at zero (the
    model starts as the base); A_i ~ N(0, 1/n), the other s_i, t_i ~ N(0, in^-1/2) so that
    W_down's entries have variance 1/in. Placement and sizes as `bottleneck`.
    """

    method: Literal["compacter"] = "compacter"  # type: ignore[assignment]
    phm_dim: int = Field(default=4, gt=0)

    kronecker: ClassVar[bool] = True

    def size_problem(self, hidden: int) -> tuple[str, str] | None:
        problem = super().size_problem(hidden)
        if problem:
            return problem
        size = self.size_for(hidden)
        if hidden % self.phm_dim or size % self.phm_dim:
            return "phm_dim", (f"{self.phm_dim} must divide the hidden size ({hidden}) and the "
                               f"bottleneck size ({size}); choose a common divisor of both")
        return None

    def count(self, hidden: int, layers: int) -> int:
        """n³ shared A_i; per adapter (d + m) for each rank-one PHM projection, + biases."""
        size = self.size_for(hidden)
        per_adapter = 2 * (hidden + size) + size + hidden
        return self.phm_dim ** 3 + layers * len(self.sublayers) * per_adapter


def _hidden_size(model_path: str) -> int | None:
    """The hidden size from a local model's config.json (Llama-style or GPT-2 keys)."""
    from peftune.models.sources import local_config_dir

    config_file = (local_config_dir(model_path) or Path(model_path).expanduser()) / "config.json"
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except (OSError, ValueError):
        return None
    config = config.get("text_config") or config
    value = config.get("hidden_size") or config.get("n_embd")
    return int(value) if isinstance(value, int) else None


_BECAUSE = "its adapters sit beside the frozen base"
for _name, _config, _description, _paper in (
    ("bottleneck", BottleneckConfig,
     "series / parallel bottleneck adapters (down, nonlinearity, up) on attention / MLP",
     "Houlsby et al. 2019, arXiv:1902.00751; He et al. 2022"),
    ("compacter", CompacterConfig,
     "bottleneck adapters whose projections are Kronecker sums Σ A_i ⊗ s_i·t_iᵀ",
     "Mahabadi et al. 2021, arXiv:2106.04647"),
):
    register(MethodSpec(
        name=_name, config=_config, apply="peftune.adapters.bottleneck.model:apply_bottleneck",
        description=_description, paper=_paper, mergeable=False, exports_plain_lora=False,
        quantized=BNB_4BIT | INT8 | INT4, unquantized_because=_BECAUSE,
        native_loader="peftune.adapters.bottleneck.model:load_bottleneck",
    ))
