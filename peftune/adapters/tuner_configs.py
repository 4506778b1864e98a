"""Recipe configs of peft's other weight-space tuners (torch-free): AdaLoRA, VeRA, VB-LoRA,
RandLoRA, MiSS / Bone, SHiRA, LoKr, LoHa, OFT, BOFT, HRA, (IA)³ and Poly / MHR.

Each config names its paper, its keys with the defaults used here, and builds its peft
config in `peft_config()`; all are applied by `peftune.adapters.tuners:apply_tuner`.
Defaults follow peft's unless a peft default cannot fit a small model (noted per key).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from peftune.adapters.lora_configs import TargetedConfig
from peftune.adapters.registry import BNB_4BIT, INT8, MethodSpec, register

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

    @model_validator(mode="after")
    def _budget(self) -> AdaLoraConfig:
        if self.target_r > self.init_r:
            raise ValueError(f"adapter.target_r ({self.target_r}) must not exceed adapter.init_r "
                             f"({self.init_r}): AdaLoRA only prunes rank")
        return self

    def peft_config(self, *, total_steps: int | None = None, **_: Any) -> Any:
        from peft import AdaLoraConfig as PeftAdaLora

        from peftune.errors import InputError

        if total_steps is not None and total_steps - self.tinit - self.tfinal <= 0:
            raise InputError(f"adapter.tinit + adapter.tfinal ({self.tinit} + {self.tfinal}) "
                             f"leave no pruning steps in a run of {total_steps} steps; lower "
                             "them or train longer")
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

    def divisor_problem(self, name: str, fan_in: int, fan_out: int) -> str | None:
        if fan_in % self.vector_length or fan_out % self.vector_length:
            return (f"adapter.vector_length: {self.vector_length} must divide the dimensions "
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

    def divisor_problem(self, name: str, fan_in: int, fan_out: int) -> str | None:
        if fan_in % self.r or fan_out % self.r:
            return (f"adapter.r: {self.method} splits each layer into blocks of r; {self.r} "
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


class LokrConfig(TunerConfig):
    """LoKr (Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS
    Fine-Tuning to Model Evaluation", arXiv:2309.14859; covers DiffuseKronA's Kronecker
    update): ΔW = C ⊗ (B·A), a Kronecker product with a low-rank factor. r 8, alpha 16,
    `decompose_both` also factors C, `decompose_factor` -1 (automatic split)."""

    method: Literal["lokr"] = "lokr"
    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16, gt=0)
    rank_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    module_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    decompose_both: bool = False
    decompose_factor: int = -1

    peft_class: ClassVar[str] = "LoKrConfig"

    def peft_kwargs(self) -> dict:
        return dict(r=self.r, alpha=self.alpha, rank_dropout=self.rank_dropout,
                    module_dropout=self.module_dropout, decompose_both=self.decompose_both,
                    decompose_factor=self.decompose_factor)


class LohaConfig(TunerConfig):
    """LoHa (Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for
    Communication-Efficient Federated Learning", arXiv:2108.06098): ΔW = (B1·A1) ⊙
    (B2·A2), rank up to r² with 2r(in+out) parameters. r 8, alpha 16."""

    method: Literal["loha"] = "loha"
    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16, gt=0)
    rank_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    module_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    peft_class: ClassVar[str] = "LoHaConfig"
    rank_key: ClassVar[str | None] = "r"

    def peft_kwargs(self) -> dict:
        return dict(r=self.r, alpha=self.alpha, rank_dropout=self.rank_dropout,
                    module_dropout=self.module_dropout)

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        return sum(2 * self.r * (layer.dims[0] + layer.dims[1]) for layer in layers)


class OftConfig(TunerConfig):
    """OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal
    Finetuning", arXiv:2306.07280): W' = R·W with R block-diagonal orthogonal (Cayley
    parametrisation); `block_size` 8 (must divide every targeted layer's input width),
    `coft` constrains R near I by `eps`, `block_share` shares one block per layer."""

    method: Literal["oft"] = "oft"
    block_size: int = Field(default=8, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    coft: bool = False
    eps: float = Field(default=6e-5, gt=0.0)
    block_share: bool = False

    peft_class: ClassVar[str] = "OFTConfig"

    def peft_kwargs(self) -> dict:
        return dict(r=0, oft_block_size=self.block_size, module_dropout=self.dropout,
                    coft=self.coft, eps=self.eps, block_share=self.block_share)

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        # each block is skew-symmetric: b(b-1)/2 free entries (the Cayley map makes it orthogonal)
        per_block = self.block_size * (self.block_size - 1) // 2
        return sum(per_block * (1 if self.block_share else layer.dims[0] // self.block_size)
                   for layer in layers)

    def divisor_problem(self, name: str, fan_in: int, fan_out: int) -> str | None:
        if fan_in % self.block_size:
            return (f"adapter.block_size: {self.block_size} must divide the input width of "
                    f"every targeted layer; {name} has {fan_in}")
        return None


class BoftConfig(TunerConfig):
    """BOFT (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly
    Factorization", arXiv:2311.06243): the orthogonal R of OFT as a product of
    `n_butterfly_factor` + 1 sparse butterfly factors of blocks of `block_size` (4)."""

    method: Literal["boft"] = "boft"
    block_size: int = Field(default=4, gt=0)
    n_butterfly_factor: int = Field(default=1, ge=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    peft_class: ClassVar[str] = "BOFTConfig"

    def peft_kwargs(self) -> dict:
        return dict(boft_block_size=self.block_size, boft_block_num=0,
                    boft_n_butterfly_factor=self.n_butterfly_factor,
                    boft_dropout=self.dropout)

    def divisor_problem(self, name: str, fan_in: int, fan_out: int) -> str | None:
        if fan_in % self.block_size:
            return (f"adapter.block_size: {self.block_size} must divide the input width of "
                    f"every targeted layer; {name} has {fan_in}")
        return None


class HraConfig(TunerConfig):
    """HRA (Yuan et al. 2024, "Bridging The Gap between Low-rank and Orthogonal Adaptation
    via Householder Reflection Adaptation", arXiv:2405.17484; the nearest to ETHER's
    hyperplane reflections): W' = W·Π_i (I - 2 u_i u_iᵀ) with r (8, even) trained
    reflections per layer; `apply_gs` orthogonalises them (Gram-Schmidt)."""

    method: Literal["hra"] = "hra"
    r: int = Field(default=8, gt=0)
    apply_gs: bool = False

    peft_class: ClassVar[str] = "HRAConfig"
    rank_key: ClassVar[str | None] = "r"

    def peft_kwargs(self) -> dict:
        return dict(r=self.r, apply_GS=self.apply_gs)

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        return sum(self.r * layer.dims[0] for layer in layers)


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


class PolyConfig(TunerConfig):
    """Polytropon (Ponti et al. 2023, "Combining Parameter-efficient Modules for Task-level
    Generalisation", arXiv:2202.13914): an inventory of `n_skills` LoRA modules (rank r)
    per layer, mixed by a learned routing. One task (every row has task id 0): peftune's
    data rows carry no task ids yet. `mhr` splits each module into `n_splits` heads."""

    method: Literal["poly"] = "poly"
    r: int = Field(default=8, gt=0)
    n_skills: int = Field(default=4, gt=0)
    n_splits: int = Field(default=1, gt=0)

    peft_class: ClassVar[str] = "PolyConfig"
    rank_key: ClassVar[str | None] = "r"

    def peft_kwargs(self) -> dict:
        return dict(r=self.r, n_tasks=1, n_skills=self.n_skills, n_splits=self.n_splits,
                    poly_type="poly")

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        # n_skills LoRA pairs per layer (split into heads, same total) + the task's routing logits
        return sum(self.n_skills * self.r * (layer.dims[0] + layer.dims[1])
                   + self.n_skills * self.n_splits for layer in layers)


class MhrConfig(PolyConfig):
    """Multi-Head Routing (Caccia et al. 2023, "Multi-Head Adapter Routing for Cross-Task
    Generalization", arXiv:2211.03831): Polytropon whose modules are split into `n_splits`
    (4) heads, each routed on its own; peft's Poly with `n_splits > 1`."""

    method: Literal["mhr"] = "mhr"  # type: ignore[assignment]
    n_splits: int = Field(default=4, gt=1)


def _register(name: str, config: type[TunerConfig], description: str, paper: str, *,
              mergeable: bool = True, quantized: frozenset[str], because: str) -> None:
    register(MethodSpec(
        name=name, config=config, apply="peftune.adapters.tuners:apply_tuner",
        description=description, paper=paper, mergeable=mergeable, exports_plain_lora=False,
        quantized=quantized, unquantized_because=because,
    ))


_NO_4BIT = "peft has no bitsandbytes 4-bit layer for it: training fails on a 4-bit base"
_NO_INT8 = "peft's 8-bit layer for it fails to train"
_NO_INT4 = "peft has no HQQ layer for it"
_register("adalora", AdaLoraConfig, "SVD-form LoRA whose rank budget is pruned by importance",
          "Zhang et al. 2023, arXiv:2303.10512", quantized=BNB_4BIT | INT8, because=_NO_INT4)
_register("vera", VeraConfig, "shared frozen random A, B; trained scaling vectors",
          "Kopiczko et al. 2024, arXiv:2310.11454", quantized=BNB_4BIT | INT8, because=_NO_INT4)
_register("vblora", VbloraConfig, "A, B assembled from a shared trained vector bank",
          "Li et al. 2024, arXiv:2405.15179", quantized=BNB_4BIT | INT8, because=_NO_INT4)
_register("randlora", RandloraConfig, "full-rank sum of fixed random bases; diagonal scalings train",
          "Albert et al. 2025, arXiv:2502.00987", quantized=BNB_4BIT | INT8, because=_NO_INT4)
_register("miss", MissConfig, "one trained shard shared across W's blocks (MiSS)",
          "Kang et al. 2024, arXiv:2409.15371", quantized=BNB_4BIT | INT8, because=_NO_INT4)
_register("bone", BoneConfig, "block-affine update guided by W's own blocks (MiSS 'bat')",
          "Kang 2024, arXiv:2409.15371v1", quantized=BNB_4BIT | INT8, because=_NO_INT4)
_register("shira", ShiraConfig, "train a fixed sparse subset (~r(in+out)) of W's entries",
          "Bhardwaj et al. 2024, arXiv:2406.13175", quantized=BNB_4BIT | INT8, because=_NO_INT4)
_register("lokr", LokrConfig, "Kronecker-product update C ⊗ (B·A)",
          "Yeh et al. 2024, arXiv:2309.14859", quantized=INT8, because=_NO_4BIT)
_register("loha", LohaConfig, "Hadamard product of two low-rank updates",
          "Hyeon-Woo et al. 2022, arXiv:2108.06098", quantized=INT8, because=_NO_4BIT)
_register("oft", OftConfig, "block-diagonal orthogonal rotation of W (Cayley)",
          "Qiu et al. 2023, arXiv:2306.07280", quantized=BNB_4BIT | INT8, because=_NO_INT4)
_register("boft", BoftConfig, "orthogonal rotation of W from butterfly factors",
          "Liu et al. 2024, arXiv:2311.06243", quantized=BNB_4BIT | INT8, because=_NO_INT4)
_register("hra", HraConfig, "chain of r trained Householder reflections of W",
          "Yuan et al. 2024, arXiv:2405.17484", quantized=INT8, because=_NO_4BIT)
_register("ia3", Ia3Config, "learned rescaling vectors on keys, values and FFN",
          "Liu et al. 2022, arXiv:2205.05638", quantized=BNB_4BIT | INT8, because=_NO_INT4)
_register("poly", PolyConfig, "routed inventory of LoRA skills (one task)",
          "Ponti et al. 2023, arXiv:2202.13914", mergeable=False, quantized=BNB_4BIT,
          because="peft's Poly layer fails to train over 8-bit and has no HQQ layer")
_register("mhr", MhrConfig, "Poly with per-head routing (multi-head routing)",
          "Caccia et al. 2023, arXiv:2211.03831", mergeable=False, quantized=BNB_4BIT,
          because="peft's Poly layer fails to train over 8-bit and has no HQQ layer")
