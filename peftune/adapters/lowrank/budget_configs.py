"""Recipe configs (torch-free) of four native methods that spend a low-rank adapter's
parameter budget differently, on the same layer (`peftune.adapters.lowrank.layer`):
shards shared across layers (MoS), a frozen random fraction of the entries (LoRA-SP),
rank grown where it matters during training (IncreLoRA), and projections frozen one by one
as they stop mattering (AFLoRA). Each exports an exact plain PEFT LoRA (per-module ranks for
IncreLoRA). Init rules: `inits.py` (MoS, LoRA-SP, AFLoRA, named by their configs'
`init_rule`); AFLoRA's freezing: `training_hooks.py`; IncreLoRA has its own `apply`
(`increlora.py`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from peftune.adapters.lowrank.configs import LowRankConfig, NativeTargetedConfig, ScaledConfig
from peftune.adapters.registry import BNB_4BIT, INT8, MethodSpec, register


class MosConfig(ScaledConfig):
    """MoS, mixture of shards (Wang et al. 2024, "MoS: Unleashing Parameter Efficiency of
    Low-Rank Adaptation with Mixture of Shards", arXiv:2410.00938): every rank-one vector
    of A (a row, width `in`) and of B (a column, height `out`) is cut into
    `shards_per_vector` shards, so a layer's A and B are r·shards_per_vector shard slots
    each. A `private_fraction` of each layer's slots hold the layer's own shards; the rest
    are filled, by fixed routing indices drawn from `seed`, from global pools shared by
    every targeted layer whose shards have the same width (A and B pools apart: the
    paper's pair dissociation). A pool holds 1/`sharing_ratio` of the public slots of the
    layers drawing from it (at least one layer's worth, so a layer's shards are distinct).
    A shards start as LoRA's A (uniform ±1/√in), B shards at zero; the update is
    (alpha/r)·B·A. The paper reports about 8x parameter savings over LoRA."""

    method: Literal["mos"] = "mos"
    shards_per_vector: int = Field(default=2, gt=0)
    sharing_ratio: float = Field(default=8.0, ge=1.0)
    private_fraction: float = Field(default=0.125, ge=0.0, le=1.0)
    seed: int = 0
    init_rule: ClassVar[str] = "mos_init"

    def divisor_problem(self, name: str, fan_in: int, fan_out: int) -> tuple[str, str] | None:
        if fan_in % self.shards_per_vector or fan_out % self.shards_per_vector:
            return ("shards_per_vector", f"{self.shards_per_vector} must divide the dimensions "
                    f"of every targeted layer; {name} is {fan_in} x {fan_out}")
        return None

    def slots(self) -> tuple[int, int]:
        """(private, public) shard slots of one factor of one layer."""
        total = self.r * self.shards_per_vector
        private = int(round(self.private_fraction * total))
        return private, total - private

    def pool_sizes(self, dims: list[tuple[int, int]]) -> dict[tuple[str, int], int]:
        """(factor, shard width) -> number of shards in that global pool."""
        private, public = self.slots()
        users: dict[tuple[str, int], int] = {}
        for fan_in, fan_out in dims:
            for key in (("A", fan_in // self.shards_per_vector),
                        ("B", fan_out // self.shards_per_vector)):
                users[key] = users.get(key, 0) + 1
        if public == 0:
            return {key: 0 for key in users}
        return {key: max(public, math.ceil(public * count / self.sharing_ratio))
                for key, count in users.items()}

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        dims = [layer.dims for layer in layers]
        private, _ = self.slots()
        pools = sum(size * width for (_, width), size in self.pool_sizes(dims).items())
        return pools + sum(private * (fan_in + fan_out) // self.shards_per_vector
                           for fan_in, fan_out in dims)


class LoraSpConfig(ScaledConfig):
    """LoRA-SP (Zhang et al. 2024, "LoRA-SP: Streamlined Partial Parameter Adaptation for
    Resource-Efficient Fine-Tuning of Large Language Models", arXiv:2403.08822): LoRA
    (A uniform ±1/√in, B zero, update (alpha/r)·B·A) where a random `frozen_fraction` of
    the entries of every A and every B, drawn from `seed`, is frozen at its initial value.
    Only the free entries are parameters (A and B are rebuilt from them and the frozen
    values each forward), so the trainable count is exactly the free entries and no
    optimizer (weight decay included) can move a frozen one."""

    method: Literal["lora-sp"] = "lora-sp"
    frozen_fraction: float = Field(default=0.5, ge=0.0, lt=1.0)
    seed: int = 0
    init_rule: ClassVar[str] = "sparse_init"

    def frozen(self, numel: int) -> int:
        return int(self.frozen_fraction * numel)  # floor: at least one entry stays free

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        count = 0
        for layer in layers:
            fan_in, fan_out = layer.dims
            for numel in (self.r * fan_in, fan_out * self.r):
                count += numel - self.frozen(numel)
        return count


class IncreloraConfig(NativeTargetedConfig):
    """IncreLoRA (Zhang et al. 2023, "IncreLoRA: Incremental Parameter Allocation Method
    for Parameter-Efficient Fine-tuning", arXiv:2308.12043): every module starts with
    `init_r` rank-one components (A row uniform ±1/√in, B column zero, update
    (alpha/init_r)·Σ B_i·A_i) and components are added, during training, to the modules
    that matter most, until the run holds `target_r` components per module on average
    (default: halfway between init_r and max_r), never more than `max_r` in one module.

    Importance is AdaLoRA's smoothed sensitivity: for every entry w of an active
    component, I = |w·∂L/∂w|, Ī <- beta1·Ī + (1-beta1)·I, Ū <- beta2·Ū + (1-beta2)·|I - Ī|;
    a module's score is the mean of Ī·Ū over its active entries. After step t, when
    t > warmup_steps, (t - warmup_steps) is a multiple of add_interval, and t is within
    the first `add_until` of the run, the highest-scored modules below max_r get one new
    component each: `components_per_add` of them, or (default) the remaining budget spread
    evenly over the remaining addition steps. A new component leaves the model unchanged
    (its B column is zero). Simplest reading of the paper: no orthogonality penalty, and a
    new component trains at the run's current learning rate.

    Optimizer state: every module preallocates its components as separate parameters up
    to what it can ever hold, min(max_r, init_r + budget - init_r·modules). An inactive
    one is detached in the forward, so its gradient is None and the optimizer (AdamW and
    bitsandbytes' optimizers skip such parameters) keeps no state for it and applies no
    weight decay: when it is activated its moments start at zero with a fresh step count
    (bias correction from step 1), and the active components' state is never touched.
    The trainable count is therefore that preallocated capacity."""

    method: Literal["increlora"] = "increlora"
    init_r: int = Field(default=4, gt=0)
    max_r: int = Field(default=12, gt=0)
    target_r: float | None = Field(default=None, gt=0)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    warmup_steps: int = Field(default=10, ge=0)
    add_interval: int = Field(default=10, gt=0)
    add_until: float = Field(default=0.8, gt=0.0, le=1.0)
    components_per_add: int | None = Field(default=None, gt=0)
    beta1: float = Field(default=0.85, gt=0.0, lt=1.0)
    beta2: float = Field(default=0.85, gt=0.0, lt=1.0)

    rank_key: ClassVar[str | None] = "max_r"
    schedules_by_length: ClassVar[bool] = True
    # Components not yet activated hold trainable parameters that take no part in a step.
    ddp_unused_parameters: ClassVar[bool] = True

    @model_validator(mode="after")
    def _ranks(self) -> IncreloraConfig:
        if self.max_r < self.init_r:
            raise ValueError(f"adapter.max_r ({self.max_r}) must not be below adapter.init_r "
                             f"({self.init_r}): IncreLoRA only adds rank")
        if self.target_r is not None and not self.init_r <= self.target_r <= self.max_r:
            raise ValueError(f"adapter.target_r ({self.target_r}) must lie between adapter.init_r "
                             f"({self.init_r}) and adapter.max_r ({self.max_r})")
        return self

    def recipe_problems(self, recipe: Any) -> list[tuple[tuple[str, ...], str]]:
        steps = recipe.train.max_steps
        if steps is not None and self.average_rank() > self.init_r and not self.addition_steps(steps):
            return [(("adapter", "warmup_steps"), (
                f"adapter.warmup_steps ({self.warmup_steps}) + adapter.add_interval "
                f"({self.add_interval}) leave no step to add components within "
                f"adapter.add_until ({self.add_until}) of a run of {steps} steps"))]
        return []

    def scaling(self) -> float:
        return self.alpha / self.init_r

    def average_rank(self) -> float:
        return (self.init_r + self.max_r) / 2 if self.target_r is None else self.target_r

    def budget(self, modules: int) -> int:
        """Components the run ends with at most, over `modules` modules."""
        return int(round(self.average_rank() * modules))

    def capacity(self, modules: int) -> int:
        """Components one module preallocates."""
        return min(self.max_r, self.init_r + self.budget(modules) - self.init_r * modules)

    def addition_steps(self, total_steps: int) -> list[int]:
        last = math.floor(self.add_until * total_steps)
        return list(range(self.warmup_steps + self.add_interval, last + 1, self.add_interval))

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        capacity = self.capacity(len(layers))
        return sum(capacity * (layer.dims[0] + layer.dims[1]) for layer in layers)


class AfloraConfig(LowRankConfig):
    """AFLoRA (Liu et al. 2024, "AFLoRA: Adaptive Freezing of Low Rank Adaptation in
    Parameter Efficient Fine-Tuning of Large Models", arXiv:2403.13269): the path
    ΔW = Λ_u·B·Λ_d·A, a down-projection A (r x in) and an up-projection B (out x r), each
    followed by a trained feature-transformation vector (Λ_d = diag of r entries, `d_init`
    at init; Λ_u = diag of `out` entries, zero at init, so ΔW = 0); A and B Kaiming. A and B
    train at first and are frozen one by one by their freezing score: after each optimizer
    step, per projection, the sensitivity I = |θ ⊙ ∇θ| is smoothed (Ī <- β1·Ī + (1-β1)·I)
    with its uncertainty (Ū <- β2·Ū + (1-β2)·|I - Ī|), and the score is mean(Ī ⊙ Ū). The
    fraction of projections frozen follows a cubic schedule, 0 until `warmup` of the run,
    1 - (1 - progress)^3 after it, all frozen for the `final` part of the run; the
    lowest-scoring trainable projections freeze first, for good (the vectors always train).
    The paper reports up to +0.85% on GLUE against LoRA with up to 9.5x fewer trained
    parameters and up to 1.86x faster runs."""

    method: Literal["aflora"] = "aflora"
    d_init: float = Field(default=0.1, gt=0)
    warmup: float = Field(default=0.1, ge=0.0, lt=1.0, description="fraction of the run "
                          "before any projection freezes")
    final: float = Field(default=0.2, ge=0.0, lt=1.0, description="fraction of the run at "
                         "the end with every projection frozen")
    beta1: float = Field(default=0.85, gt=0.0, lt=1.0)
    beta2: float = Field(default=0.95, gt=0.0, lt=1.0)
    schedules_by_length: ClassVar[bool] = True
    ddp_unused_parameters: ClassVar[bool] = True  # a frozen projection gets no gradient
    core: ClassVar[str | None] = "diag"
    trainable: ClassVar[tuple[str, ...]] = ("A", "M", "B")  # B: the projection and Λ_u
    init_rule: ClassVar[str] = "aflora_init"
    training_hooks: ClassVar[tuple[str, ...]] = ("freeze_projections",)

    @model_validator(mode="after")
    def _room_to_freeze(self) -> AfloraConfig:
        if self.warmup + self.final >= 1:
            raise ValueError(f"adapter.warmup ({self.warmup}) + adapter.final ({self.final}) "
                             "leave no part of the run to freeze projections in; keep their "
                             "sum below 1")
        return self

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        return sum(self.r * (fan_in + fan_out) + self.r + fan_out
                   for fan_in, fan_out in (layer.dims for layer in layers))


_ADDS = BNB_4BIT | INT8
for _name, _config, _apply, _description, _paper in (
    ("mos", MosConfig, "peftune.adapters.lowrank.model:apply_lowrank",
     "LoRA whose A, B are routed shards of global pools shared across layers",
     "Wang et al. 2024, arXiv:2410.00938 (MoS)"),
    ("lora-sp", LoraSpConfig, "peftune.adapters.lowrank.model:apply_lowrank",
     "LoRA with a seeded random fraction of its entries frozen",
     "Zhang et al. 2024, arXiv:2403.08822 (LoRA-SP)"),
    ("increlora", IncreloraConfig, "peftune.adapters.lowrank.increlora:apply_increlora",
     "rank components added during training to the most important modules",
     "Zhang et al. 2023, arXiv:2308.12043 (IncreLoRA)"),
    ("aflora", AfloraConfig, "peftune.adapters.lowrank.model:apply_lowrank",
     "A, B with trained vectors after each; A and B frozen one by one by a freezing score",
     "Liu et al. 2024, arXiv:2403.13269 (AFLoRA)"),
):
    register(MethodSpec(name=_name, config=_config, apply=_apply, description=_description,
                        paper=_paper, mergeable=True, exports_plain_lora=True, quantized=_ADDS))
