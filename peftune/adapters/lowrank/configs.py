"""Recipe configs of the native low-rank methods (torch-free), all on one layer shape,
ΔW = s · B·M·A (`peftune.adapters.lowrank.layer`). A config is the whole definition of its
method: its keys, which factors exist and train (`core`, `trainable`), whether its init
moves part of W into the factors (`residual`), its init rule (`init_rule`, a function of
`inits.py`) and the hooks it gives the training loop (`training_hooks`, functions of
`training_hooks.py`); `peftune.adapters.lowrank.model.apply_lowrank` applies any of them.
Every method exports an exact plain PEFT LoRA (B·M folded into B; for residual inits the
change W_trained - W_original, rank <= 2r) that applies to the original base.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from peftune.adapters.calibration import Calibration
from peftune.adapters.registry import BNB_4BIT, INT8, RESIDUAL, MethodSpec, register
from peftune.adapters.targets import TargetedConfig


class NativeTargetedConfig(TargetedConfig):
    """Keys of every native low-rank method: the targets, without peft's modules_to_save."""

    @field_validator("modules_to_save")
    @classmethod
    def _no_modules_to_save(cls, value: list[str] | None) -> list[str] | None:
        if value:
            raise ValueError("native low-rank methods do not train full copies of modules; "
                             "use a peft method (lora) for modules_to_save")
        return value


class LowRankConfig(NativeTargetedConfig):
    """Keys every native method shares; methods whose factors come from W itself (its SVD,
    LU or Nyström sketch) use them unscaled and have no `alpha`."""

    r: int = Field(default=8, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    rank_key: ClassVar[str | None] = "r"
    core: ClassVar[str | None] = None  # None | "full" (r x r) | "diag"
    trainable: ClassVar[tuple[str, ...]] = ("A", "B")  # of A, M, B, scalar, seq
    residual: ClassVar[bool] = False
    sequential: ClassVar[bool] = False
    calibrated: ClassVar[bool] = False
    # How the factors start: the name of a function of `inits.py` (LoRA's A Kaiming, B zero)
    init_rule: ClassVar[str] = "lora_init"
    # What the loop calls while training: names of functions of `training_hooks.py`
    training_hooks: ClassVar[tuple[str, ...]] = ()

    def scaling(self) -> float:
        return 1.0

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        count = 0
        for layer in layers:
            fan_in, fan_out = layer.dims
            sizes = {"A": self.r * fan_in, "B": fan_out * self.r, "scalar": 1,
                     "M": self.r * self.r if self.core == "full" else self.r,
                     "seq": 2 * self.r * fan_out}
            count += sum(sizes[f] for f in self.trainable)
        return count


class ScaledConfig(LowRankConfig):
    """A native method with LoRA's scaling: the update is multiplied by alpha / r."""

    alpha: float = Field(default=16, gt=0)

    def scaling(self) -> float:
        return self.alpha / self.r


class SoraConfig(ScaledConfig):
    """SoRA (Ding et al. 2023, "Sparse Low-rank Adaptation of Pre-trained Language Models",
    arXiv:2311.11696): B·diag(g)·A with a gate g (ones at init) between A and B. After each
    optimizer step a proximal L1 step soft-thresholds the gates,
    g <- sign(g)·max(|g| - lr·sparsity, 0) (lr = train.lr), so ranks switch off; zero gates
    are pruned from the exported LoRA (per-module ranks). r 8 is the maximum rank."""

    method: Literal["sora"] = "sora"
    sparsity: float = Field(default=0.1, ge=0.0)
    core: ClassVar[str | None] = "diag"
    trainable: ClassVar[tuple[str, ...]] = ("A", "M", "B")
    training_hooks: ClassVar[tuple[str, ...]] = ("soft_threshold_gates",)


class DyloraConfig(ScaledConfig):
    """DyLoRA (Valipour et al. 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained
    Models using Dynamic Search-Free Low-Rank Adaptation", arXiv:2210.07558): every step
    samples b in [min_rank, r] and trains with the truncated product B[:, :b]·A[:b, :]
    scaled by alpha/b, so one adapter serves every rank up to r. `export_rank` (default r)
    is the rank evaluated and exported."""

    method: Literal["dylora"] = "dylora"
    min_rank: int = Field(default=1, gt=0)
    export_rank: int | None = Field(default=None, gt=0)
    training_hooks: ClassVar[tuple[str, ...]] = ("sample_rank",)

    @model_validator(mode="after")
    def _ranks(self) -> DyloraConfig:
        if self.min_rank > self.r:
            raise ValueError(f"adapter.min_rank ({self.min_rank}) must not exceed adapter.r ({self.r})")
        if self.export_rank is not None and self.export_rank > self.r:
            raise ValueError(f"adapter.export_rank ({self.export_rank}) must not exceed the "
                             f"maximum rank adapter.r ({self.r})")
        return self


class DyrankConfig(ScaledConfig):
    """Dynamic-rank DoRA (Mao et al. 2024, "DoRA: Enhancing Parameter-Efficient Fine-Tuning
    with Dynamic Rank Distribution", ) -- NOT the weight-decomposed `dora`
    of Liu et al. ΔW = Σ_i c_i·B[:, i]·A[i, :] with c = 0 at init. The importance of
    component i, ‖c_i·B[:, i]·A[i, :]‖_F / ‖ΔW‖_F, is smoothed by an EMA (`beta`); between
    `prune_start` and `prune_end` (fractions of the run) a global threshold prunes
    components on a cubic schedule from r per layer to an average of `target_r`. Until
    pruning ends a variance regulariser (weight `regularizer`) on A's rows and B's columns
    keeps each component's entries evenly spread (the paper's dimensional equilibrium)."""

    method: Literal["dyrank"] = "dyrank"
    r: int = Field(default=12, gt=0)
    target_r: int = Field(default=8, gt=0)
    beta: float = Field(default=0.85, ge=0.0, lt=1.0)
    prune_start: float = Field(default=0.1, ge=0.0, lt=1.0)
    prune_end: float = Field(default=0.8, gt=0.0, le=1.0)
    regularizer: float = Field(default=1e-4, ge=0.0)
    schedules_by_length: ClassVar[bool] = True
    core: ClassVar[str | None] = "diag"
    trainable: ClassVar[tuple[str, ...]] = ("A", "M", "B")
    init_rule: ClassVar[str] = "dyrank_init"
    training_hooks: ClassVar[tuple[str, ...]] = ("prune_components",)

    @model_validator(mode="after")
    def _schedule(self) -> DyrankConfig:
        if self.target_r > self.r:
            raise ValueError(f"adapter.target_r ({self.target_r}) must not exceed adapter.r ({self.r})")
        if self.prune_end <= self.prune_start:
            raise ValueError(f"adapter.prune_end ({self.prune_end}) must come after "
                             f"adapter.prune_start ({self.prune_start})")
        return self


class SloraConfig(ScaledConfig):
    """SLoRA (Guo et al. 2025, "NLoRA: Nyström-Initiated Low-Rank Adaptation for Large
    Language Models", its baseline): ΔW = B·M·A with a trained r x r core
    M (identity at init), A Kaiming, B zero."""

    method: Literal["slora"] = "slora"
    core: ClassVar[str | None] = "full"
    trainable: ClassVar[tuple[str, ...]] = ("A", "M", "B")


class NloraConfig(LowRankConfig):
    """NLoRA (Guo et al. 2025, "NLoRA: Nyström-Initiated Low-Rank Adaptation"): B·M·A
    initialised from a Nyström approximation of W, C·pinv(W[I, J])·R from r sampled
    columns C = W[:, J] and rows R = W[I, :], without a full SVD (set as a balanced B, M = I,
    A; see inits.nystrom_init); W is replaced by the residual W - B·M·A (unscaled: no
    alpha). `seed` chooses the rows and columns. The paper reports GSM8K 57.70% against
    SLoRA's 56.48%."""

    method: Literal["nlora"] = "nlora"
    seed: int = 0
    core: ClassVar[str | None] = "full"
    trainable: ClassVar[tuple[str, ...]] = ("A", "M", "B")
    residual: ClassVar[bool] = True
    init_rule: ClassVar[str] = "nystrom_init"


class InttuneConfig(NloraConfig):
    """IntTune (Guo et al. 2025, the NLoRA paper): NLoRA's Nyström init with only the
    r x r core M trained (r² parameters per layer); A and B stay frozen. The paper reports
    +7.45% NLG over LoRA with 1.25% of its parameters."""

    method: Literal["inttune"] = "inttune"  # type: ignore[assignment]
    trainable: ClassVar[tuple[str, ...]] = ("M",)


class LoraSbConfig(ScaledConfig):
    """LoRA-SB (Ponkshe et al. 2024, "Initialization using Update Approximation is a Silver
    Bullet for Extreme Efficient Low-Rank Fine-Tuning"), on LoRA-XS's
    structure: W + s·B·R·A with A, B frozen and only the r x r R trained. The full-weight
    gradient G is estimated over `calibration` batches (per layer, from its inputs and
    output gradients, so it works over a quantized base); B = U_r and A = V_rᵀ from the
    truncated SVD of -G, R = 0, so R's first gradient is -s·diag(S_r) and the first
    update is the best rank-r approximation of full fine-tuning's."""

    method: Literal["lora-sb"] = "lora-sb"
    calibration: Calibration = Calibration()
    core: ClassVar[str | None] = "full"
    trainable: ClassVar[tuple[str, ...]] = ("M",)
    calibrated: ClassVar[bool] = True
    init_rule: ClassVar[str] = "gradient_svd_init"


class LamdaConfig(ScaledConfig):
    """LaMDA (Azizi et al. 2024, "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed
    Low-Dimensional Adaptation"): the path B·S·A with A frozen (Kaiming),
    an r x r S trained (identity at init), and B trained (zero at init) for the first
    `train_b_for` fraction of the run, then frozen. The paper reports up to 17.7x fewer
    parameter updates and 1.32x lower peak memory."""

    method: Literal["lamda"] = "lamda"
    train_b_for: float = Field(default=0.3, ge=0.0, le=1.0)
    schedules_by_length: ClassVar[bool] = True
    core: ClassVar[str | None] = "full"
    trainable: ClassVar[tuple[str, ...]] = ("M", "B")
    training_hooks: ClassVar[tuple[str, ...]] = ("freeze_b_late",)


class SvfitConfig(LowRankConfig):
    """SVFit (Sun et al. 2024, "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained
    Models Using Singular Values"): W = U·S·Vᵀ; the top-r singular values
    train (r parameters per layer), scaling the frozen U_r and V_r; the rest of W stays
    frozen. The paper reports beating LoRA with 16x fewer trainable parameters."""

    method: Literal["svfit"] = "svfit"
    core: ClassVar[str | None] = "diag"
    trainable: ClassVar[tuple[str, ...]] = ("M",)
    residual: ClassVar[bool] = True
    init_rule: ClassVar[str] = "svd_init"


class LolduConfig(SvfitConfig):
    """LoLDU (Shi et al. 2024, "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper
    Decomposition for Parameter-Efficient Fine-Tuning"): the pivoted LU
    decomposition W = P·L·D·U (L unit lower, U unit upper, D diagonal); the first r
    components P·L[:, :r], D[:r], U[:r] form the adapter, and only the diagonal D[:r] and
    one scalar scale train (r + 1 per layer). W is replaced by the residual."""

    method: Literal["loldu"] = "loldu"  # type: ignore[assignment]
    trainable: ClassVar[tuple[str, ...]] = ("M", "scalar")
    init_rule: ClassVar[str] = "ldu_init"


class NolaConfig(ScaledConfig):
    """NOLA (Koohpayegani et al. 2024, "NOLA: Compressing LoRA using Linear Combination of
    Random Basis", arXiv:2310.02556): A = Σ_i α_i·A_i and B = Σ_j β_j·B_j over
    `num_basis` frozen random bases per factor and layer, regenerated from `basis_seed`;
    only α and β train (2·num_basis per layer) and are saved. β = 0 at init."""

    method: Literal["nola"] = "nola"
    num_basis: int = Field(default=64)
    basis_seed: int = 0
    trainable: ClassVar[tuple[str, ...]] = ("A", "B")
    init_rule: ClassVar[str] = "nola_init"

    @field_validator("num_basis")
    @classmethod
    def _bases(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"NOLA needs at least one random basis per factor; got {value}")
        return value

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        return 2 * self.num_basis * len(layers)


class S2loraConfig(ScaledConfig):
    """Sparsely shared LoRA (Liu et al. 2023, "Sparsely Shared LoRA on Whisper for Child
    Speech Recognition"): one A, B pair shared by all targeted modules
    of the same shape, and per-module rank coefficients c_m (ΔW_m = B·diag(c_m)·A) pushed
    to sparsity by an L1 penalty of weight `sparsity`."""

    method: Literal["s2lora"] = "s2lora"
    sparsity: float = Field(default=1e-4, ge=0.0)
    core: ClassVar[str | None] = "diag"
    trainable: ClassVar[tuple[str, ...]] = ("A", "M", "B")
    init_rule: ClassVar[str] = "shared_init"
    training_hooks: ClassVar[tuple[str, ...]] = ("l1_on_coefficients",)

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        shapes = {layer.dims for layer in layers}
        return (sum(self.r * (fan_in + fan_out) for fan_in, fan_out in shapes)
                + self.r * len(layers))


class SorsaConfig(LowRankConfig):
    """SORSA (Cao 2024, "SORSA: Singular Values and Orthonormal Regularized Singular Vectors
    Adaptation of Large Language Models"): the principal part
    U_p·diag(S_p)·V_pᵀ of W's SVD trains (U_p, S_p, V_p), the residual stays frozen, and
    `regularizer` (γ) weighs ‖U_pᵀU_p - I‖_F + ‖V_pᵀV_p - I‖_F. The paper reports Llama 2
    7B GSM-8K 56.03% (LoRA 42.30%, PiSSA 53.07%)."""

    method: Literal["sorsa"] = "sorsa"
    regularizer: float = Field(default=4e-4, ge=0.0)
    core: ClassVar[str | None] = "diag"
    trainable: ClassVar[tuple[str, ...]] = ("A", "M", "B")
    residual: ClassVar[bool] = True
    init_rule: ClassVar[str] = "svd_init"
    training_hooks: ClassVar[tuple[str, ...]] = ("orthonormal_penalty",)


class HydraConfig(ScaledConfig):
    """Hydra (Kim et al. 2024, "Hydra: Multi-head Low-rank Adaptation for Parameter
    Efficient Fine-tuning"): a parallel branch B_p·A_p·x plus a
    sequential branch B_s·A_s·(W·x), both LoRA-initialised (B zero); it merges as
    W + B_p·A_p + B_s·A_s·W, so inference costs nothing extra."""

    method: Literal["hydra"] = "hydra"
    trainable: ClassVar[tuple[str, ...]] = ("A", "B", "seq")
    sequential: ClassVar[bool] = True


_ADDS = BNB_4BIT | INT8
for _name, _config, _description, _paper, _quantized, _because in (
    ("sora", SoraConfig, "gated LoRA; proximal L1 steps switch ranks off, pruned on export",
     "Ding et al. 2023, arXiv:2311.11696", _ADDS, ""),
    ("dylora", DyloraConfig, "LoRA trained at a sampled rank each step; one adapter, any rank",
     "Valipour et al. 2023, arXiv:2210.07558", _ADDS, ""),
    ("dyrank", DyrankConfig, "dynamic-rank DoRA (Mao et al.): gated components pruned globally",
     "Mao et al. 2024 (ACL), dynamic rank distribution", _ADDS, ""),
    ("slora", SloraConfig, "B·M·A with a trained r x r core",
     "Guo et al. 2025, NLoRA (Nyström-initiated LoRA)", _ADDS, ""),
    ("nlora", NloraConfig, "B·M·A from a Nyström sketch of W; W becomes the residual",
     "Guo et al. 2025, NLoRA (Nyström-initiated LoRA)", frozenset(), RESIDUAL),
    ("inttune", InttuneConfig, "Nyström B·M·A with only the r x r core M trained",
     "Guo et al. 2025, NLoRA (Nyström-initiated LoRA)", frozenset(), RESIDUAL),
    ("lora-sb", LoraSbConfig, "frozen A, B from the gradient's SVD; only r x r R trains",
     "Ponkshe et al. 2024, LoRA-SB", _ADDS, ""),
    ("lamda", LamdaConfig, "frozen A, trained core S, B trained early then frozen",
     "Azizi et al. 2024, LaMDA", _ADDS, ""),
    ("svfit", SvfitConfig, "only the top-r singular values of W train",
     "Sun et al. 2024, SVFit", frozenset(), RESIDUAL),
    ("loldu", LolduConfig, "LDU of W; only the diagonal and a scalar train",
     "Shi et al. 2024, LoLDU", frozenset(), RESIDUAL),
    ("nola", NolaConfig, "A, B as trained mixtures of seeded random bases",
     "Koohpayegani et al. 2024, arXiv:2310.02556", _ADDS, ""),
    ("s2lora", S2loraConfig, "one A, B per layer shape; sparse per-module rank coefficients",
     "Liu et al. 2023, Sparsely Shared LoRA", _ADDS, ""),
    ("sorsa", SorsaConfig, "trained SVD principal part with an orthonormal regulariser",
     "Cao 2024, SORSA", frozenset(), RESIDUAL),
    ("hydra", HydraConfig, "parallel B·A plus sequential B·A·W branch",
     "Kim et al. 2024, Hydra", BNB_4BIT,
     "its sequential branch needs the base weight, read from 4-bit layers only"),
):
    register(MethodSpec(
        name=_name, config=_config, apply="peftune.adapters.lowrank.model:apply_lowrank",
        description=_description, paper=_paper, mergeable=True, exports_plain_lora=True,
        quantized=_quantized, **({"unquantized_because": _because} if _because else {}),
    ))
