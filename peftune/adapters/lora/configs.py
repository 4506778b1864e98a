"""Recipe configs of the LoRA family, all trained through peft's `LoraConfig` (torch-free).

One config per recipe name; the keys they share live on `LoraConfig`, and each variant
adds only what its paper adds: an init rule (PiSSA, OLoRA, CorDA, EVA, LoRA-GA, LoftQ) or
a different scaling / decomposition (rsLoRA, DoRA). `peft_config()` builds the peft object
and is only called when a model is built.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from peftune.adapters.calibration import Calibration
from peftune.adapters.registry import BNB_4BIT, INT4, INT8, RESIDUAL, MethodSpec, register
from peftune.adapters.targets import TargetedConfig


class LoraConfig(TargetedConfig):
    """LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
    arXiv:2106.09685): W + (alpha/r)·B·A, A Kaiming-initialised, B zero, through peft.

    Keys: r 8, alpha 16, dropout 0.0, target_modules all-linear, bias none,
    modules_to_save none; `rslora: true` scales by alpha/sqrt(r) (rsLoRA), `dora: true`
    adds DoRA's magnitude vector (see the `rslora` and `dora` methods)."""

    method: Literal["lora"] = "lora"
    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    rslora: bool = False
    dora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"

    rank_key: ClassVar[str | None] = "r"
    has_lora_b: ClassVar[bool] = True  # train.loraplus_ratio applies
    targets_embeddings: ClassVar[bool] = True  # peft's LoRA also adapts embedding layers
    # True for inits that rewrite the frozen weight (W -> W - B0·A0): their export is
    # converted by peft into a plain LoRA of rank 2r that applies to the original base.
    rewrites_base: ClassVar[bool] = False
    # True for inits that run the model over `adapter.calibration` examples.
    calibrated: ClassVar[bool] = False

    def init_lora_weights(self) -> Any:
        return True

    def recipe_problems(self, recipe: Any) -> list[tuple[tuple[str, ...], str]]:
        problems = []
        if self.dora and (self.rewrites_base or isinstance(self, LoftqConfig)):
            problems.append((("adapter", "dora"), f"adapter.method {self.method} sets the "
                             "adapter from the base weight, and DoRA's magnitude (taken from the "
                             "base before that) would not match it; remove dora: true"))
        if self.rewrites_base:
            # the export re-expresses the adapter on the original W, as LoRA's A and B only
            why = (f"{self.method}'s export is converted into a plain LoRA on the original "
                   "base, which carries only the A and B matrices")
            if self.modules_to_save:
                problems.append((("adapter", "modules_to_save"),
                                 f"{why}; remove modules_to_save or use method lora"))
            if self.bias != "none":
                problems.append((("adapter", "bias"), f"{why}; use bias: none or method lora"))
        return problems

    def peft_kwargs(self) -> dict:
        return dict(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                    target_modules=self.target_modules, use_rslora=self.rslora,
                    use_dora=self.dora, bias=self.bias, modules_to_save=self.modules_to_save,
                    init_lora_weights=self.init_lora_weights(), task_type="CAUSAL_LM")

    def peft_config(self, **_: Any) -> Any:
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(**self.peft_kwargs())

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        count = sum(self.r * (layer.dims[0] + layer.dims[1]) for layer in layers)
        if self.dora:  # one magnitude per output feature
            count += sum(layer.dims[1] for layer in layers)
        if self.bias == "all":
            count += model["all_biases"]
        elif self.bias == "lora_only":
            count += sum(layer.bias for layer in layers)
        return count


class RsLoraConfig(LoraConfig):
    """rsLoRA (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning
    with LoRA", arXiv:2312.03732): LoRA scaled by alpha/sqrt(r), so higher ranks keep
    learning; peft's `use_rslora`."""

    method: Literal["rslora"] = "rslora"  # type: ignore[assignment]
    rslora: bool = True


class DoraConfig(LoraConfig):
    """DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation",
    arXiv:2402.09353): W' = m · (W + s·B·A) / ‖W + s·B·A‖_c, a trained magnitude per output
    column times the normalised LoRA-updated direction; peft's `use_dora`. Not the
    dynamic-rank "DoRA" of Mao et al. 2024."""

    method: Literal["dora"] = "dora"  # type: ignore[assignment]
    dora: bool = True


class PissaConfig(LoraConfig):
    """PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors
    Adaptation", arXiv:2404.02948): A, B from the top-r SVD of W, which is replaced by the
    residual W - B·A. `niter: K` uses peft's fast randomised SVD with K subspace iterations
    (`pissa_niter_K`); null computes the exact SVD. The export is a plain LoRA (rank 2r)."""

    method: Literal["pissa"] = "pissa"  # type: ignore[assignment]
    niter: int | None = Field(default=None, gt=0)
    rewrites_base: ClassVar[bool] = True

    def init_lora_weights(self) -> Any:
        return "pissa" if self.niter is None else f"pissa_niter_{self.niter}"


class OloraConfig(LoraConfig):
    """OLoRA (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language
    Models", arXiv:2406.01775): A, B from a QR decomposition of W (orthonormal basis), W
    replaced by the residual. The export is a plain LoRA (rank 2r)."""

    method: Literal["olora"] = "olora"  # type: ignore[assignment]
    rewrites_base: ClassVar[bool] = True

    def init_lora_weights(self) -> Any:
        return "olora"


class CalibratedConfig(LoraConfig):
    """A LoRA init that runs the model over `calibration` examples first."""

    calibration: Calibration = Calibration()
    calibrated: ClassVar[bool] = True


class CordaConfig(CalibratedConfig):
    """CorDA (Yang et al. 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large
    Language Models", arXiv:2406.05223): SVD of W·C, C the covariance of the layer's inputs
    over the calibration examples. `mode: ipm` (instruction-previewed) trains the r
    largest components, `kpm` (knowledge-preserved) the r smallest, keeping what the model
    knows. W is replaced by the residual; the export is a plain LoRA (rank 2r)."""

    method: Literal["corda"] = "corda"  # type: ignore[assignment]
    mode: Literal["ipm", "kpm"] = "ipm"
    rewrites_base: ClassVar[bool] = True

    def init_lora_weights(self) -> Any:
        return "corda"

    def peft_config(self, **_: Any) -> Any:
        from peft import LoraConfig as PeftLoraConfig

        from peftune.compat import corda_config

        return PeftLoraConfig(**self.peft_kwargs(), corda_config=corda_config(self.mode))


class EvaConfig(CalibratedConfig):
    """EVA (Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via
    Explained Variance Adaptation", arXiv:2410.07170): A from the right singular vectors
    of each layer's inputs over the calibration examples (incremental SVD), B zero; ranks
    are redistributed across layers by explained variance, up to `rho`·r per layer (rho 2;
    1 keeps r everywhere). `tau` is the SVD convergence threshold (0.99)."""

    method: Literal["eva"] = "eva"  # type: ignore[assignment]
    rho: float = Field(default=2.0, ge=1.0)
    tau: float = Field(default=0.99, gt=0.0, le=1.0)
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def init_lora_weights(self) -> Any:
        return "eva"

    def peft_config(self, **_: Any) -> Any:
        from peft import EvaConfig as PeftEva
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(**self.peft_kwargs(), eva_config=PeftEva(
            rho=self.rho, tau=self.tau, whiten=self.whiten,
            adjust_scaling_factors=self.adjust_scaling_factors))

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        return None if self.rho > 1 else super().estimate_trainable(layers, model)


class LoraGaConfig(CalibratedConfig):
    """LoRA-GA (Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient
    Approximation", arXiv:2407.05000): A, B from the SVD of the full-weight gradient
    estimated over the calibration examples, so the first step follows full fine-tuning.
    `direction` picks which singular vectors go to A and B (ArB2r), `scale` the init scale
    (stable, with `stable_gamma` 16). W is replaced by the residual; the export is a plain
    LoRA (rank 2r). peft's implementation (`init_lora_weights="lora_ga"`)."""

    method: Literal["lora-ga"] = "lora-ga"  # type: ignore[assignment]
    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = "ArB2r"
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = "stable"
    stable_gamma: int = Field(default=16, gt=0)
    rewrites_base: ClassVar[bool] = True

    def init_lora_weights(self) -> Any:
        return "lora_ga"

    def peft_config(self, **_: Any) -> Any:
        from peft import LoraConfig as PeftLoraConfig
        from peft import LoraGAConfig

        return PeftLoraConfig(**self.peft_kwargs(), lora_ga_config=LoraGAConfig(
            direction=self.direction, scale=self.scale, stable_gamma=self.stable_gamma))


class LoftqConfig(LoraConfig):
    """LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large
    Language Models", arXiv:2310.08659): on a 4-bit base Q = q(W), initialise B·A from the
    top-r SVD of the quantization error W - Q, so that Q + s·B·A ≈ W before training.
    One alternation step, computed by peftune on any device (peft's utility needs CUDA):
    the base stays exactly the nf4/fp4 quantization of W, so the exported adapter applies
    to the model loaded in 4-bit by any tool."""

    method: Literal["loftq"] = "loftq"  # type: ignore[assignment]

    def recipe_problems(self, recipe: Any) -> list[tuple[tuple[str, ...], str]]:
        problems = super().recipe_problems(recipe)
        if recipe.quant.method == "none":  # another quantization is refused with its reason
            problems.append((("adapter", "method"), "loftq initialises LoRA from the "
                             "quantization error of a 4-bit base; set quant.method: nf4 or fp4 "
                             f"(got {recipe.quant.method})"))
        return problems


_LORA_QUANT = BNB_4BIT | INT8 | INT4


def _register(name: str, config: type[LoraConfig], description: str, paper: str, *,
              quantized: frozenset[str] = _LORA_QUANT, because: str = "",
              plain: bool = True) -> None:
    register(MethodSpec(
        name=name, config=config, apply="peftune.adapters.lora.model:apply_lora",
        description=description, paper=paper, mergeable=True, exports_plain_lora=plain,
        quantized=quantized, **({"unquantized_because": because} if because else {}),
    ))


_register("lora", LoraConfig, "low-rank update W + (alpha/r)·B·A on the chosen linear layers",
          "Hu et al. 2021, arXiv:2106.09685")
_register("rslora", RsLoraConfig, "LoRA scaled by alpha/sqrt(r) (rank-stabilised)",
          "Kalajdzievski 2023, arXiv:2312.03732")
_register("dora", DoraConfig, "weight-decomposed LoRA: trained magnitude x normalised W + BA",
          "Liu et al. 2024, arXiv:2402.09353", plain=False, quantized=BNB_4BIT | INT4,
          because="peft's DoRA has no 8-bit path (its int8 layer fails to train)")
_register("pissa", PissaConfig, "A, B from the top-r SVD of W; W becomes the residual",
          "Meng et al. 2024, arXiv:2404.02948", quantized=frozenset(), because=RESIDUAL)
_register("olora", OloraConfig, "A, B from a QR decomposition of W; W becomes the residual",
          "Büyükakyüz 2024, arXiv:2406.01775", quantized=frozenset(), because=RESIDUAL)
_register("corda", CordaConfig, "SVD of W times the input covariance of calibration data",
          "Yang et al. 2024, arXiv:2406.05223", quantized=frozenset(), because=RESIDUAL)
_register("eva", EvaConfig, "A from the SVD of calibration activations; ranks redistributed",
          "Paischer et al. 2024, arXiv:2410.07170", quantized=BNB_4BIT,
          because="checked over 4-bit bitsandbytes bases only (nf4, fp4)")
_register("lora-ga", LoraGaConfig, "A, B from the SVD of the estimated full gradient",
          "Wang et al. 2024, arXiv:2407.05000", quantized=frozenset(), because=RESIDUAL)
_register("loftq", LoftqConfig, "QLoRA init: B·A fits the 4-bit quantization error of W",
          "Li et al. 2023, arXiv:2310.08659", quantized=BNB_4BIT,
          because="it needs a bitsandbytes 4-bit base (quant.method: nf4 or fp4)")
