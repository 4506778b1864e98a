"""The recipe's `quant:` section: the frozen base's quantization and EoRA's compensation of
it (`peftune.quant` implements both). Torch-free."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from peftune.adapters.calibration import Calibration
from peftune.recipe.section import Section


class Compensation(Section):
    """`quant.compensation`: `eora` or `{name: eora, damp, calibration}`. EoRA (arXiv:
    2410.21271) sets the LoRA adapter's B·A, at `adapter.r`, to the rank-r correction of each
    quantized layer's error W - dequant(q(W)) that is best for its inputs on `calibration`
    (`peftune.quant.eora`). `damp`: added to the input covariance's eigenvalues, as a
    fraction of their mean."""

    name: Literal["eora"] = "eora"
    damp: float = Field(default=0.01, gt=0, le=1)
    calibration: Calibration = Calibration()

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class QuantSection(Section):
    """The frozen base's quantization. nf4/fp4/int8: bitsandbytes; int4: HQQ 4-bit integer
    codes in groups of `group_size` inputs, each group with its own scale and zero
    (`peftune.quant.hqq`). `compute_dtype` is the dtype the quantized matmuls run in; `auto`:
    bfloat16 where the device computes it natively (a recent GPU, a CPU with AVX512-BF16 or
    AMX), float16 on older GPUs, else float32 (emulated bf16 on CPU is ~18x slower)."""

    method: Literal["none", "nf4", "fp4", "int8", "int4"] = "none"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # nf4/fp4 only: the dtype the packed 4-bit codes are stored in (bitsandbytes'
    # bnb_4bit_quant_storage). FSDP flattens a block's parameters into one dtype, so FSDP +
    # QLoRA needs it equal to the rest of the model (bfloat16); uint8 is bitsandbytes' default.
    storage_dtype: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    # int4 only (filled in as 64 when unset); a multiple of 8, as hqq requires.
    group_size: int | None = Field(default=None, gt=0, multiple_of=8, validate_default=True)
    # EoRA: a LoRA adapter that starts as a low-rank correction of the quantization error
    compensation: Compensation | None = None

    @field_validator("compensation", mode="before")
    @classmethod
    def _no_compensation(cls, value: Any) -> Any:
        return None if value == "none" else value

    @model_validator(mode="before")
    @classmethod
    def _int4_has_no_double_quant(cls, data: Any) -> Any:
        # double_quant's default (true) is the nf4/fp4 one; int4 has none, and the resolved
        # recipe must say so (a saved `double_quant: true` would not load back).
        if isinstance(data, dict) and data.get("method") == "int4" and "double_quant" not in data:
            data = {**data, "double_quant": False}
        return data

    @field_validator("double_quant")
    @classmethod
    def _double_quant(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("method") == "int4":
            raise ValueError("int4 (HQQ) keeps each group's scale and zero unquantized "
                             "(hqq 0.2.8 dropped double quantization); remove the key or set "
                             "it to false")
        return value

    @field_validator("storage_dtype")
    @classmethod
    def _storage_dtype(cls, value: str, info: ValidationInfo) -> str:
        method = info.data.get("method")
        if value != "uint8" and method not in (None, "nf4", "fp4"):
            raise ValueError(f"applies only to quant.method: nf4 or fp4, not {method}; remove "
                             "it or use quant.method: nf4")
        return value

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int | None, info: ValidationInfo) -> int | None:
        method = info.data.get("method")
        if method == "int4":
            return 64 if value is None else value  # HQQ's usual 4-bit group
        if value is not None and method is not None:
            raise ValueError(f"applies only to quant.method: int4, not {method}; remove it "
                             "or use quant.method: int4")
        return value

    def recipe_problems(self, recipe: Any) -> list[tuple[tuple[str, ...], str]]:
        """What `compensation` needs from the rest of the recipe: a quantized base and a
        plain LoRA adapter (its B·A becomes the compensation, at the adapter's rank)."""
        if self.compensation is None:
            return []
        where = ("quant", "compensation")
        if self.method == "none":
            return [(where, "eora compensates the error of a quantized base, and quant.method "
                            "is none; set quant.method: nf4 (or fp4, int8, int4), or remove "
                            "quant.compensation")]
        method = recipe.adapter.method
        if method != "lora":
            also = ("; loftq already starts from the quantization error (plain SVD): use one "
                    "of the two" if method == "loftq" else "")
            return [(where, f"eora starts a LoRA adapter (its B·A) as the compensation, and "
                            f"adapter.method is {method}; use adapter.method: lora, or remove "
                            f"quant.compensation{also}")]
        return []
