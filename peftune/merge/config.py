"""merge.yaml: several LoRA adapters (`adapters:`) or full fine-tuned models (`models:` with
`base:`, `peftune.merge.model_merge`) of one base combined by a merge method. A `merge:`
section, read as recipes are (`peftune.recipe.yamlfile`) and validated so that every
problem is reported at once as `merge.yaml:LINE: merge.key: message`. Torch-free.

    merge:
      method: ties                 # `peftune merge --help` / docs/merging.md list them
      adapters:
        - {path: runs/math, weight: 1.0, density: 0.3}
        - {path: runs/code}        # weight 1, merge.density
      density: 0.5                 # kept fraction per adapter (trim / DARE), in (0, 1]
      lambda: 1.0                  # scales the merged delta
      seed: 0                      # DARE's drop masks, lora_lego's k-means start
      k: 8                         # lora_lego only: merged rank (clusters of rank units)
      out: runs/merged
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from peftune.errors import InputError
from peftune.merge.registry import MERGE_METHODS, merge_method_names
from peftune.recipe.errors import Locations, Problem, did_you_mean, locate, pydantic_problems, show
from peftune.recipe.yamlfile import read_yaml, unique_lines

Density = Field(default=None, gt=0, le=1)


class MergeAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str = Field(description="a training run directory or a PEFT LoRA adapter directory")
    weight: float = 1.0
    density: float | None = Density


class MergeSection(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    method: str = Field(description="linear, task_arithmetic, ties, dare_linear, ...")
    adapters: list[MergeAdapter] = Field(default_factory=list)
    models: list[MergeAdapter] = Field(default_factory=list)  # full fine-tunes of `base`
    t: float | None = Field(default=None, ge=0, le=1)
    base: str | None = None
    density: float | None = Density
    lambda_: float = Field(default=1.0, alias="lambda")
    q: float | None = Field(default=None, gt=0, le=1)
    seed: int = 0  # DARE's drop masks, lora_lego's k-means
    k: int | None = Field(default=None, ge=1)
    out: str | None = None
    out_rank: int | None = Field(default=None, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    shard_size: str = "5GB"

    @field_validator("method")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in MERGE_METHODS:
            raise ValueError(f"unknown merge method; choose one of: "
                             f"{', '.join(merge_method_names())}{did_you_mean(value, merge_method_names())}")
        return value

    @property
    def inputs(self) -> list[MergeAdapter]:
        return self.adapters or self.models

    def density_of(self, i: int) -> float:
        own = self.inputs[i].density
        return own if own is not None else (self.density if self.density is not None else 1.0)


def load_merge_config(path: Path) -> tuple[MergeSection, Locations]:
    """The validated merge section and where each key was written (for later path errors)."""
    data, where, problems = read_yaml(path)
    extra = sorted(set(data) - {"merge"})
    if extra:
        problems.append(Problem(locate((extra[0],), where), (extra[0],),
                                "a merge file has only a merge: section (method:, adapters:, ...)"))
    section = data.get("merge")
    if not isinstance(section, dict):
        raise InputError(f"{locate(('merge',), where).text}: merge: expected a mapping (method:, "
                         f"adapters:, ...), got {show(section)}")
    config = None
    try:
        config = MergeSection.model_validate(section)
    except ValidationError as err:
        problems += pydantic_problems(err.errors(include_url=False), data, where,
                                      root=MergeSection, prefix=("merge",))
    if config is not None:
        problems += _method_problems(config, where)
    if problems or config is None:
        raise InputError(*unique_lines(problems))
    return config, where


def _method_problems(config: MergeSection, where: Locations) -> list[Problem]:
    """Keys that the chosen method needs, or does not read (a key it ignores is an error)."""
    method = MERGE_METHODS[config.method]
    problems = []

    def problem(path: tuple, message: str) -> None:
        problems.append(Problem(locate(("merge", *path), where), ("merge", *path), message))

    if method.uses_q and config.q is None:
        problem(("q",), f"required by {config.method}: survivors are rescaled by 1/q, q in (0, 1]")
    if not method.uses_q and config.q is not None:
        problem(("q",), f"{config.method} does not use q (only darex_q does); remove it")
    if bool(config.adapters) == bool(config.models):
        problem(("adapters",), "give either adapters: (LoRA runs) or models: (full fine-tuned "
                               "models, with base:), not both or neither")
    if config.models and config.base is None:
        problem(("base",), "required with models: the base they were fine-tuned from (task "
                           "vectors are model − base)")
    if method.uses_t:
        if not config.models or len(config.models) != 2:
            problem(("models",), f"{config.method} interpolates exactly 2 models: list two "
                                 "under models:")
        if config.t is None:
            problem(("t",), f"required by {config.method}: the interpolation point in [0, 1]")
    elif config.t is not None:
        problem(("t",), f"{config.method} does not use t (only slerp does); remove it")
    if method.uses_k and config.models:
        problem(("models",), f"{config.method} clusters LoRA rank units: it merges adapters:")
    if method.uses_k and config.k is None:
        problem(("k",), f"required by {config.method}: the merged rank (number of k-means "
                        "clusters of the adapters' rank units), an integer >= 1")
    if not method.uses_k and config.k is not None:
        problem(("k",), f"{config.method} does not use k (only lora_lego does); remove it")
    if not method.uses_density:
        hint = ("density does not apply: use ties, dare_linear, dare_ties, darex_q, pcb or "
                "magnitude_prune, or remove it")
        if config.density is not None:
            problem(("density",), f"{config.method} keeps every entry, so {hint}")
        key = "adapters" if config.adapters else "models"
        for i, adapter in enumerate(config.inputs):
            if adapter.density is not None:
                problem((key, i, "density"), f"{config.method} keeps every entry, so {hint}")
    return problems


def where_text(where: Locations, *path: object) -> str:
    return locate(("merge", *path), where).text
