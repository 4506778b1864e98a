"""Recipe configs of peft's other weight-space tuners (torch-free): AdaLoRA, VeRA, VB-LoRA,
RandLoRA, MiSS / Bone, SHiRA and (IA)³ (`product_configs.py` has the rest).

Each config names its paper, its keys with the defaults used here, and builds its peft
config in `peft_config()`; all are applied by `peftune.adapters.tuners.model:apply_tuner`.
Defaults follow peft's unless a peft default cannot fit a small model (noted per key).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from peftune.adapters.registry import BNB_4BIT, INT8, MethodSpec, register
from peftune.adapters.targets import TargetedConfig

LLAMA_ATTENTION_VALUE_FFN = ["k_proj", "v_proj", "down_proj"]


class TunerConfig(TargetedConfig):
    """A peft tuner: `peft_class` names peft's config class, `peft_kwargs()` maps the
    recipe keys onto its arguments."""

    peft_class: ClassVar[str] = ""

    def peft_kwargs(self) -> dict:
        return {}

    def peft_config(self, *, total_steps: int | None = None, **_: Any) -> Any:
        import peft

        return getattr(peft, self.peft_class)(task_type="CAUSAL_LM",
                                              target_modules=self.target_modules,
                                              modules_to_save=self.modules_to_save,
                                              **self.peft_kwargs())


class AdaLoraConfig(TunerConfig):
    """AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient
    Fine-Tuning", arXiv:2303.10512): ΔW = P·Λ·Q in SVD form; the singular values Λ of
    unimportant triplets are pruned on a cubic schedule from `init_r` to an average of
    `target_r` per layer, between step `tinit` and `total - tfinal`, every `delta_t` steps
    (importance EMAs `beta1`, `beta2`); `orth_reg_weight` weighs the orthogonality penalty
    on P and Q. peft's `update_and_allocate` runs after each optimizer step (a hook)."""

    method: Literal["adalora"] = "adalora"
    init_r: int = Field(default=12, gt=0)
    target_r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    tinit: int = Field(default=0, ge=0)
    tfinal: int = Field(default=0, ge=0)
    delta_t: int = Field(default=1, gt=0)
    beta1: float = Field(default=0.85, gt=0.0, lt=1.0)
    beta2: float = Field(default=0.85, gt=0.0, lt=1.0)
    orth_reg_weight: float = Field(default=0.5, ge=0.0)

    peft_class: ClassVar[str] = "AdaLoraConfig"
    rank_key: ClassVar[str | None] = "init_r"
    has_lora_b: ClassVar[bool] = True
    schedules_by_length: ClassVar[bool] = True

    def recipe_problems(self, recipe: Any) -> list[tuple[tuple[str, ...], str]]:
        problem = self._no_pruning_steps(recipe.train.max_steps)
        return [(("adapter", "tfinal"), problem)] if problem else []

    def _no_pruning_steps(self, steps: int | None) -> str | None:
        if steps is not None and steps - self.tinit - self.tfinal <= 0:
            return (f"adapter.tinit + adapter.tfinal ({self.tinit} + {self.tfinal}) leave no "
                    f"pruning steps in a run of {steps} steps; lower them or train longer")
        return None

    @model_validator(mode="after")
    def _budget(self) -> AdaLoraConfig:
        if self.target_r > self.init_r:
            raise ValueError(f"adapter.target_r ({self.target_r}) must not exceed adapter.init_r "
                             f"({self.init_r}): AdaLoRA only prunes rank")
        return self

    def peft_config(self, *, total_steps: int | None = None, **_: Any) -> Any:
        from peft import AdaLoraConfig as PeftAdaLora

        from peftune.errors import InputError

        problem = self._no_pruning_steps(total_steps)  # a run counted in epochs
        if problem:
            raise InputError(f"adapter.tfinal: {problem}")
        return PeftAdaLora(task_type="CAUSAL_LM", target_modules=self.target_modules,
                           modules_to_save=self.modules_to_save, init_r=self.init_r,
                           target_r=self.target_r, lora_alpha=self.alpha,
                           lora_dropout=self.dropout, tinit=self.tinit, tfinal=self.tfinal,
                           deltaT=self.delta_t, beta1=self.beta1, beta2=self.beta2,
                           orth_reg_weight=self.orth_reg_weight, total_step=total_steps)

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        # P (init_r x in), Q (out x init_r), Λ (init_r); pruning masks, never removes them
        return sum(self.init_r * (layer.dims[0] + layer.dims[1] + 1) for layer in layers)


class VeraConfig(TunerConfig):
    """VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation",
    arXiv:2310.11454): one pair of frozen random matrices A, B shared by all layers, with
    trained scaling vectors: ΔW = Λ_b·B·Λ_d·A. `r` 256 (peft's default; the shared
    matrices are frozen, so rank costs r trained scalars per layer), `d_initial` 0.1,
    `projection_prng_key` the seed of A and B (saved with the adapter)."""

    method: Literal["vera"] = "vera"
    r: int = Field(default=256, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    d_initial: float = Field(default=0.1, gt=0.0)
    projection_prng_key: int = 0

    peft_class: ClassVar[str] = "VeraConfig"

    def peft_kwargs(self) -> dict:
        return dict(r=self.r, vera_dropout=self.dropout, d_initial=self.d_initial,
                    projection_prng_key=self.projection_prng_key, save_projection=True)

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        return sum(self.r + layer.dims[1] for layer in layers)  # λ_d (r) and λ_b (out)


class VbloraConfig(TunerConfig):
    """VB-LoRA (Li et al. 2024, "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with
    Vector Banks", arXiv:2405.15179): every sub-vector of every A and B is a top-k mixture
    of vectors from one shared, trained bank of `num_vectors` vectors of `vector_length`
    (which must divide every targeted layer's dimensions). Defaults: r 4, num_vectors 256,
    vector_length 64 (peft's 256 does not divide small models' widths), topk 2."""

    method: Literal["vblora"] = "vblora"
    r: int = Field(default=4, gt=0)
    num_vectors: int = Field(default=256, gt=0)
    vector_length: int = Field(default=64, gt=0)
    topk: int = Field(default=2, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    peft_class: ClassVar[str] = "VBLoRAConfig"
    rank_key: ClassVar[str | None] = "r"

    def peft_kwargs(self) -> dict:
        return dict(r=self.r, num_vectors=self.num_vectors, vector_length=self.vector_length,
                    topk=self.topk, vblora_dropout=self.dropout)

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        # the shared bank, then per layer the top-k logits of each sub-vector of A and B
        per_layer = sum(self.r * (layer.dims[0] + layer.dims[1]) // self.vector_length
                        for layer in layers)
        return self.num_vectors * self.vector_length + per_layer * self.num_vectors

    def divisor_problem(self, name: str, fan_in: int, fan_out: int) -> tuple[str, str] | None:
        if fan_in % self.vector_length or fan_out % self.vector_length:
            return ("vector_length", f"{self.vector_length} must divide the dimensions "
                    f"of every targeted layer; {name} is {fan_in} x {fan_out}")
        return None


class RandloraConfig(TunerConfig):
    """RandLoRA (Albert et al. 2025, "RandLoRA: Full-rank parameter-efficient fine-tuning
    of large models", arXiv:2502.00987): a full-rank update as a sum of fixed random
    low-rank bases (rank `r` each, shared across layers, seeded by `projection_prng_key`);
    only diagonal scalings train. `alpha` scales the update."""

    method: Literal["randlora"] = "randlora"
    r: int = Field(default=32, gt=0)
    alpha: float = Field(default=640, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    sparse: bool = False
    very_sparse: bool = False
    projection_prng_key: int = 0

    peft_class: ClassVar[str] = "RandLoraConfig"

    def peft_kwargs(self) -> dict:
        return dict(r=self.r, randlora_alpha=self.alpha, randlora_dropout=self.dropout,
                    sparse=self.sparse, very_sparse=self.very_sparse,
                    projection_prng_key=self.projection_prng_key, save_projection=True)


class MissConfig(TunerConfig):
    """MiSS (Kang et al. 2024, "MiSS: Balancing LoRA Performance and Efficiency with Simple
    Shard Sharing", arXiv:2409.15371; peft's successor of Bone): a trained shard of size
    r x out is shared over W's input blocks. `r` (must divide every targeted layer's input
    width) 8, `dropout`. `bone` is the block-affine variant."""

    method: Literal["miss"] = "miss"
    r: int = Field(default=8, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    peft_class: ClassVar[str] = "MissConfig"
    init_weights: ClassVar[Any] = True

    def peft_kwargs(self) -> dict:
        return dict(r=self.r, miss_dropout=self.dropout, init_weights=self.init_weights)

    def divisor_problem(self, name: str, fan_in: int, fan_out: int) -> tuple[str, str] | None:
        if fan_in % self.r or fan_out % self.r:
            return ("r", f"{self.method} splits each layer into blocks of r; {self.r} "
                    f"must divide the dimensions of {name} ({fan_in} x {fan_out})")
        return None

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        return sum(self.r * layer.dims[1] for layer in layers)


class BoneConfig(MissConfig):
    """Bone (Kang 2024, "Bone: Block-Affine Adaptation of Large Language Models",
    arXiv:2409.15371v1): block-wise update that multiplies the frozen weight's own blocks
    ("weight guide") with a trained block; peft's MiSS with `init_weights="bat"`. The
    paper reports +5.84% over PiSSA on GSM8k (LLaMA2-7B)."""

    method: Literal["bone"] = "bone"  # type: ignore[assignment]
    init_weights: ClassVar[Any] = "bat"


class ShiraConfig(TunerConfig):
    """SHiRA (Bhardwaj et al. 2024, "Sparse High Rank Adapters", arXiv:2406.13175):
    train a fixed random sparse subset of the base weights, r·(in+out) entries per layer
    (the same budget as a rank-r LoRA); `random_seed` chooses the mask."""

    method: Literal["shira"] = "shira"
    r: int = Field(default=8, gt=0)
    random_seed: int = 0

    peft_class: ClassVar[str] = "ShiraConfig"

    def peft_kwargs(self) -> dict:
        return dict(r=self.r, mask_type="random", random_seed=self.random_seed)

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        return sum(self.r * (layer.dims[0] + layer.dims[1]) for layer in layers)


class Ia3Config(TunerConfig):
    """(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
    Cheaper than In-Context Learning", arXiv:2205.05638): learned vectors rescale the keys,
    values and the FFN's inner activations. Targets default to Llama/Qwen/Mistral names
    (k_proj, v_proj, down_proj); `feedforward_modules` (down_proj) are scaled on their
    input side."""

    method: Literal["ia3"] = "ia3"
    target_modules: str | list[str] = LLAMA_ATTENTION_VALUE_FFN
    feedforward_modules: list[str] = ["down_proj"]

    peft_class: ClassVar[str] = "IA3Config"

    @model_validator(mode="after")
    def _feedforward_in_targets(self) -> Ia3Config:
        if isinstance(self.target_modules, list):
            stray = [m for m in self.feedforward_modules if m not in self.target_modules]
            if stray:
                raise ValueError(f"adapter.feedforward_modules {stray} must also be in "
                                 "adapter.target_modules")
        return self

    def peft_kwargs(self) -> dict:
        return dict(feedforward_modules=self.feedforward_modules)

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        ffn = self.feedforward_modules
        return sum(layer.dims[0] if any(layer.name.endswith("." + m) for m in ffn)
                   else layer.dims[1] for layer in layers)


def register_tuner(name: str, config: type[TunerConfig], description: str, paper: str, *,
              mergeable: bool = True, quantized: frozenset[str], because: str) -> None:
    register(MethodSpec(
        name=name, config=config, apply="peftune.adapters.tuners.model:apply_tuner",
        description=description, paper=paper, mergeable=mergeable, exports_plain_lora=False,
        quantized=quantized, unquantized_because=because,
    ))


NO_4BIT = "peft has no 4-bit layer for it (bitsandbytes or HQQ): training fails on a 4-bit base"
NO_INT4 = "peft has no HQQ layer for it"
register_tuner("adalora", AdaLoraConfig, "SVD-form LoRA whose rank budget is pruned by importance",
             "Zhang et al. 2023, arXiv:2303.10512", quantized=BNB_4BIT | INT8, because=NO_INT4)
register_tuner("vera", VeraConfig, "shared frozen random A, B; trained scaling vectors",
             "Kopiczko et al. 2024, arXiv:2310.11454", quantized=BNB_4BIT | INT8, because=NO_INT4)
register_tuner("vblora", VbloraConfig, "A, B assembled from a shared trained vector bank",
             "Li et al. 2024, arXiv:2405.15179", quantized=BNB_4BIT | INT8, because=NO_INT4)
register_tuner("randlora", RandloraConfig, "full-rank sum of fixed random bases; diagonal scalings train",
             "Albert et al. 2025, arXiv:2502.00987", quantized=BNB_4BIT | INT8, because=NO_INT4)
register_tuner("miss", MissConfig, "one trained shard shared across W's blocks (MiSS)",
             "Kang et al. 2024, arXiv:2409.15371", quantized=BNB_4BIT | INT8, because=NO_INT4)
register_tuner("bone", BoneConfig, "block-affine update guided by W's own blocks (MiSS 'bat')",
             "Kang 2024, arXiv:2409.15371v1", quantized=BNB_4BIT | INT8, because=NO_INT4)
register_tuner("shira", ShiraConfig, "train a fixed sparse subset (~r(in+out)) of W's entries",
             "Bhardwaj et al. 2024, arXiv:2406.13175", quantized=BNB_4BIT | INT8, because=NO_INT4)
register_tuner("ia3", Ia3Config, "learned rescaling vectors on keys, values and FFN",
             "Liu et al. 2022, arXiv:2205.05638", quantized=BNB_4BIT | INT8, because=NO_INT4)
