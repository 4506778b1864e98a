"""Recipe configs of peft's tuners whose update is not a plain B·A (torch-free): Kronecker
(LoKr) and Hadamard (LoHa) products, orthogonal rotations of W (OFT, BOFT, HRA), and routed
mixtures of LoRA modules (Poly, MHR). Applied by `peftune.adapters.tuners.model:apply_tuner`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from peftune.adapters.registry import BNB_4BIT, INT8
from peftune.adapters.tuners.configs import NO_4BIT, NO_INT4, TunerConfig, register_tuner


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

    def divisor_problem(self, name: str, fan_in: int, fan_out: int) -> tuple[str, str] | None:
        if fan_in % self.block_size:
            return ("block_size", f"{self.block_size} must divide the input width of "
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

    def divisor_problem(self, name: str, fan_in: int, fan_out: int) -> tuple[str, str] | None:
        if fan_in % self.block_size:
            return ("block_size", f"{self.block_size} must divide the input width of "
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


register_tuner("lokr", LokrConfig, "Kronecker-product update C ⊗ (B·A)",
          "Yeh et al. 2024, arXiv:2309.14859", quantized=INT8, because=NO_4BIT)
register_tuner("loha", LohaConfig, "Hadamard product of two low-rank updates",
          "Hyeon-Woo et al. 2022, arXiv:2108.06098", quantized=INT8, because=NO_4BIT)
register_tuner("oft", OftConfig, "block-diagonal orthogonal rotation of W (Cayley)",
          "Qiu et al. 2023, arXiv:2306.07280", quantized=BNB_4BIT | INT8, because=NO_INT4)
register_tuner("boft", BoftConfig, "orthogonal rotation of W from butterfly factors",
          "Liu et al. 2024, arXiv:2311.06243", quantized=BNB_4BIT | INT8, because=NO_INT4)
register_tuner("hra", HraConfig, "chain of r trained Householder reflections of W",
          "Yuan et al. 2024, arXiv:2405.17484", quantized=INT8, because=NO_4BIT)
register_tuner("poly", PolyConfig, "routed inventory of LoRA skills (one task)",
          "Ponti et al. 2023, arXiv:2202.13914", mergeable=False, quantized=BNB_4BIT,
          because="peft's Poly layer fails to train over 8-bit and has no HQQ layer")
register_tuner("mhr", MhrConfig, "Poly with per-head routing (multi-head routing)",
          "Caccia et al. 2023, arXiv:2211.03831", mergeable=False, quantized=BNB_4BIT,
          because="peft's Poly layer fails to train over 8-bit and has no HQQ layer")
