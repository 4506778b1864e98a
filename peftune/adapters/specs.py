"""Registrations of the built-in adapter methods (configs only; torch-free).

Each method's config lists its own recipe keys with defaults; implementations live in
sibling modules and are imported only when a model is built.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from peftune.adapters.registry import MethodConfig, MethodSpec, register


class LoraConfig(MethodConfig):
    """LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
    W + (alpha/r)·B·A with A Kaiming-initialised and B zero, through peft.
    `rslora: true` scales by alpha/sqrt(r) (Kalajdzievski 2023, rank-stabilised LoRA)."""

    method: Literal["lora"] = "lora"
    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    rslora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and value != "all-linear":
            return [value]
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module, or be all-linear")
        return value


class FullConfig(MethodConfig):
    """Full fine-tuning: every parameter of the base model trains (no adapter)."""

    method: Literal["full"] = "full"


register(MethodSpec(
    name="lora",
    config=LoraConfig,
    apply="peftune.adapters.lora:apply_lora",
    description="low-rank update W + (alpha/r)·B·A on the chosen linear layers",
    paper="Hu et al. 2021, LoRA (arXiv:2106.09685)",
    mergeable=True,
    works_over_4bit=True,
    exports_plain_lora=True,
))

register(MethodSpec(
    name="full",
    config=FullConfig,
    apply="peftune.adapters.full:apply_full",
    description="full fine-tuning: every base parameter trains; exports model/",
    paper="-",
    mergeable=True,
    works_over_4bit=False,
    exports_plain_lora=False,
    trains_base_weights=True,
))
