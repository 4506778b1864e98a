"""Recipe configs of the sparse fine-tuning methods (torch-free), all on one layer
(`peftune.adapters.sparse.layer`): per targeted weight W a sorted set of flat indices
idx and a trained vector of deltas δ, W' = W + scatter(idx, δ). Only δ trains (k entries
per weight, k = `density`·numel); the methods differ in how they choose idx and when they
change it. Every method merges exactly (W' is a weight of the base's own shape) and
exports a native adapter directory (indices + deltas) that `peftune eval` and `peftune
merge` load (`peftune.adapters.sparse.export`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from peftune.adapters.calibration import Calibration
from peftune.adapters.registry import MethodSpec, register
from peftune.adapters.targets import TargetedConfig


def entry_count(density: float, numel: int) -> int:
    """The entries a weight of `numel` entries trains at `density` (at least one)."""
    return max(1, min(numel, math.floor(density * numel + 0.5)))


class SparseConfig(TargetedConfig):
    """Keys every sparse method shares: the targets and the density of trained entries."""

    density: float = Field(default=0.01, gt=0.0, le=1.0,
                           description="fraction of each targeted weight's entries that train")

    # What `apply_sparse` does with the method: how it picks the indices at init (a
    # function of `peftune.adapters.sparse.selection`) and what it hands the loop.
    selection: ClassVar[str] = "random_entries"
    calibrated: ClassVar[bool] = False
    low_rank: ClassVar[bool] = False  # DSEE: a LoRA path on the same layer

    @field_validator("modules_to_save")
    @classmethod
    def _no_modules_to_save(cls, value: list[str] | None) -> list[str] | None:
        if value:
            raise ValueError("sparse methods train entries of the targeted weights, not full "
                             "copies of modules; use a peft method (lora) for modules_to_save")
        return value

    def entries(self, fan_in: int, fan_out: int) -> int:
        """The trained entries of one weight (fan_out x fan_in)."""
        return entry_count(self.density, fan_in * fan_out)

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        return sum(self.entries(*layer.dims) for layer in layers)


class PacaConfig(SparseConfig):
    """PaCA (Woo, Namkung, Lee, Jeong, Kim and Jeon 2025, "PaCA: Partial Connection
    Adaptation for Efficient Fine-Tuning", arXiv:2503.01905): of each targeted weight W
    (out x in), `columns` input connections J (whole columns, drawn from `seed` and the
    layer's name) train directly: W' = W + ΔW with ΔW[:, J] trained, zero elsewhere, so
    y = W·x + ΔW[:, J]·x[J] needs only the selected input features for the gradient.
    `density` instead of `columns`: that fraction of each weight's columns. The paper
    reports, against LoRA, 22% less training time and 16% less memory at comparable
    accuracy."""

    method: Literal["paca"] = "paca"
    columns: int = Field(default=8, gt=0, description="input columns trained per weight")
    density: float | None = Field(default=None, gt=0.0, le=1.0,  # type: ignore[assignment]
                                  description="fraction of columns (instead of columns)")
    seed: int = 0
    selection: ClassVar[str] = "random_columns"

    @model_validator(mode="after")
    def _one_size(self) -> PacaConfig:
        if self.density is not None and "columns" in self.model_fields_set:
            raise ValueError(f"give one of adapter.columns ({self.columns}) and "
                             f"adapter.density ({self.density}), not both")
        return self

    def column_count(self, fan_in: int) -> int:
        if self.density is not None:
            return entry_count(self.density, fan_in)
        return self.columns

    def entries(self, fan_in: int, fan_out: int) -> int:
        return self.column_count(fan_in) * fan_out

    def divisor_problem(self, name: str, fan_in: int, fan_out: int) -> tuple[str, str] | None:
        if self.column_count(fan_in) > fan_in:
            return "columns", (f"{self.columns} is more than layer {name} has ({fan_in} input "
                               f"columns); use at most {fan_in}, or adapter.density")
        return None


class FishConfig(SparseConfig):
    """FISH mask (Sung, Nair and Raffel 2021, "Training Neural Networks with Fixed Sparse
    Masks", arXiv:2111.09839): the empirical Fisher information of every entry of the
    targeted weights, F_j = (1/N)·Σ_i (∂ log p(y_i | x_i) / ∂w_j)², over the N examples of
    `calibration` (one backward per example, padding dropped); the K = `density`·(entries
    of all targeted weights) entries with the largest F train (one global ranking, as in
    the paper, so a layer may hold more or fewer than its share), the mask fixed for the
    whole run. The paper reports matching or beating other sparse-update methods with less
    memory and communication."""

    method: Literal["fish"] = "fish"
    density: float = Field(default=0.005, gt=0.0, le=1.0)
    calibration: Calibration = Calibration()
    selection: ClassVar[str] = "fisher_mask"
    calibrated: ClassVar[bool] = True

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        return entry_count(self.density, sum(fan_in * fan_out for fan_in, fan_out
                                             in (layer.dims for layer in layers)))


class _RunLengthChecks(SparseConfig):
    """A key counted in optimizer steps must fit in the run (checked again at train start,
    when the run is given in epochs)."""

    steps_key: ClassVar[str] = ""
    steps_meaning: ClassVar[str] = ""

    def run_problem(self, total_steps: int) -> str | None:
        value = getattr(self, self.steps_key)
        if value >= total_steps:
            return (f"adapter.{self.steps_key}: {value} {self.steps_meaning} in a run of "
                    f"{total_steps} steps; use fewer than {total_steps}")
        return None

    def recipe_problems(self, recipe: Any) -> list[tuple[tuple[str, ...], str]]:
        steps = recipe.train.max_steps
        problem = self.run_problem(steps) if steps else None
        if problem is None:
            return []
        return [(("adapter", self.steps_key), problem.split(": ", 1)[1])]


class LtSftConfig(_RunLengthChecks):
    """LT-SFT, lottery-ticket sparse fine-tuning (Ansell, Ponti, Korhonen and Vulić 2022,
    "Composable Sparse Fine-Tuning for Cross-Lingual Transfer", arXiv:2110.07560): phase 1
    trains a dense update D of every targeted weight (W + D, D = 0 at init) for
    `full_steps` optimizer steps; then each weight keeps the k = `density`·numel entries
    that changed most (largest |D|), every entry is reset to its pretrained value, and
    phase 2 trains only those k deltas (from zero, with fresh Adam moments) for the rest of
    the run. D and its optimizer state are freed at the switch; the trainable count given
    at start is the phase-1 dense entries plus the k of phase 2. The phase is checkpoint
    state, so a run resumed on either side of the switch ends bitwise equal. The paper
    reports beating adapters by a large margin in zero-shot cross-lingual transfer."""

    method: Literal["lt-sft"] = "lt-sft"
    full_steps: int = Field(default=100, gt=0, description="optimizer steps of the dense phase")
    selection: ClassVar[str] = "placeholder_entries"  # the real ones after the dense phase
    steps_key: ClassVar[str] = "full_steps"
    steps_meaning: ClassVar[str] = "dense steps leave no sparse phase"
    # the sparse deltas take no part in phase 1's steps (nor D in phase 2's)
    ddp_unused_parameters: ClassVar[bool] = True

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        return sum(fan_in * fan_out + self.entries(fan_in, fan_out)
                   for fan_in, fan_out in (layer.dims for layer in layers))


class SpielConfig(_RunLengthChecks):
    """SpIEL (Ansell, Vulić, Sterz, Korhonen and Ponti 2024, "Scaling Sparse Fine-Tuning to
    Large Language Models", arXiv:2401.16405), its accumulated-gradient variant SpIEL-AG
    with a memory bound: every weight trains k = `density`·numel deltas at random indices
    (from `seed`) at first. Between updates the gradient of a sampled candidate set of
    entries outside the active set (`candidates` x the entries to regrow, drawn anew after
    every update) is accumulated, never a dense gradient. Every `update_interval` steps:
    drop the `drop_fraction` of active entries whose delta is smallest in magnitude (their
    change from the pretrained value), and regrow as many candidates, those with the
    largest |accumulated gradient|, so k stays fixed. Dropped entries return to their
    pretrained values; regrown ones start at zero with zero Adam moments, and the moments of
    kept entries move with them (the optimizer state is reordered with the sorted indices).
    The paper reports SpIEL often beating LoRA on LLaMA 2 7B/13B instruction tuning at
    comparable run time."""

    method: Literal["spiel"] = "spiel"
    update_interval: int = Field(default=20, gt=0, description="steps between prune-regrow updates")
    drop_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    candidates: float = Field(default=4.0, ge=1.0, description="candidates per regrown entry")
    seed: int = 0
    steps_key: ClassVar[str] = "update_interval"
    steps_meaning: ClassVar[str] = "steps between regrowths leave no regrowth"

    def recipe_problems(self, recipe: Any) -> list[tuple[tuple[str, ...], str]]:
        problems = super().recipe_problems(recipe)
        if recipe.train.optimizer == "adamw8bit":
            problems.append((("train", "optimizer"), (
                "adamw8bit keeps block-quantized 8-bit moments, which spiel cannot move with "
                "its regrown entries; use adamw or paged_adamw")))
        return problems

    def regrow_count(self, k: int) -> int:
        return max(1, math.floor(self.drop_fraction * k + 0.5)) if k > 1 else 0


class DseeConfig(SparseConfig):
    """DSEE (Chen, Chen, Chen, Awadallah, Wang and Cheng 2021/2023, "DSEE: Dually
    Sparsity-embedded Efficient Tuning of Pre-trained Language Models", arXiv:2111.00160):
    ΔW = (alpha/r)·B·A + S, a LoRA path (A Kaiming, B zero) plus a sparse residual S on the
    same weight. S's support is where W departs most from its best rank-r approximation:
    the k = `density`·numel largest entries of |W - U_r·Σ_r·V_rᵀ| (a one-step low-rank +
    sparse split of the pretrained weight, in place of the paper's GreBsmo), S = 0 at init.
    `prune_density`: at export, the merged weight W + ΔW keeps only that fraction of its
    entries, the largest in magnitude, per targeted weight (the paper's unstructured
    magnitude pruning for cheaper inference; the exported model then differs from the
    trained one by what was pruned). The paper reports about 25% inference FLOPs saved at
    comparable performance with 0.5% trainable parameters (BERT)."""

    method: Literal["dsee"] = "dsee"
    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    density: float = Field(default=0.001, gt=0.0, le=1.0)
    prune_density: float | None = Field(default=None, gt=0.0, le=1.0,
                                        description="fraction of merged entries kept at export")
    rank_key: ClassVar[str | None] = "r"
    selection: ClassVar[str] = "low_rank_residual"
    low_rank: ClassVar[bool] = True

    def scaling(self) -> float:
        return self.alpha / self.r

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        return sum(self.r * (fan_in + fan_out) + self.entries(fan_in, fan_out)
                   for fan_in, fan_out in (layer.dims for layer in layers))


_BECAUSE = "its deltas index entries of the unquantized weights, which a 4-/8-bit base does not hold"
for _name, _config, _description, _paper in (
    ("paca", PacaConfig, "random input columns of each weight train directly (no adapter)",
     "Woo et al. 2025, arXiv:2503.01905"),
    ("fish", FishConfig, "fixed sparse mask: the top entries of the empirical Fisher",
     "Sung et al. 2021, arXiv:2111.09839"),
    ("lt-sft", LtSftConfig, "dense phase, keep the entries that moved most, retrain them from W",
     "Ansell et al. 2022, arXiv:2110.07560"),
    ("spiel", SpielConfig, "fixed-density deltas; prune small, regrow by candidates' gradients",
     "Ansell et al. 2024, arXiv:2401.16405"),
    ("dsee", DseeConfig, "LoRA plus a sparse residual; optional magnitude pruning at export",
     "Chen et al. 2021, arXiv:2111.00160"),
):
    register(MethodSpec(
        name=_name, config=_config, apply="peftune.adapters.sparse.model:apply_sparse",
        description=_description, paper=_paper, mergeable=True, exports_plain_lora=False,
        unquantized_because=_BECAUSE,
        native_loader="peftune.adapters.sparse.export:load_sparse",
    ))
