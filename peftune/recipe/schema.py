"""The recipe schema: one pydantic model per section, unknown keys rejected.

Sections and keys are the recipe's public contract (README, "Recipes"). Adapter methods add
their own keys through the adapter registry (`peftune.adapters.registry`): the `adapter` section is
validated here for its shared keys and then again, whole, by the chosen method's config.
This module imports neither torch nor transformers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from peftune.recipe.quant import QuantSection
from peftune.recipe.section import Section

__all__ = ["QuantSection", "Section"]  # re-exported: their modules hold them


class ModelSection(Section):
    path: str = Field(description="local directory or hub id of the base model")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Off by default: true runs the Python files shipped with a hub model (the CLI warns).
    trust_remote_code: bool = False
    # Off by default: weights load from safetensors only; true also accepts pickle files
    # (pytorch_model.bin, adapter_model.bin), which can run code when they are loaded.
    allow_pickle: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None


class AdapterSection(Section):
    """The adapter section before the method is known. The loader re-validates it whole
    against the chosen method's config (`peftune.adapters.registry`), which replaces it."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    method: str = "lora"


# The data section's keys that say how a row becomes text, by the format that reads them. A
# source of a data mix may set these for itself (and only those its format reads); every other
# data key (max_length, truncation, packing, on_bad_row, ...) is section-wide.
FORMAT_KEYS = {
    "text": frozenset({"text_field", "add_eos"}),
    "instruction": frozenset({"prompt_field", "input_field", "response_field",
                              "prompt_template", "add_eos"}),
    "chat": frozenset({"messages_field", "roles"}),
    "preference": frozenset({"prompt_field", "chosen_field", "rejected_field",
                             "prompt_template", "add_eos", "roles"}),
    "kto": frozenset({"prompt_field", "completion_field", "label_field", "prompt_template",
                      "add_eos", "roles"}),
}
SOURCE_FORMAT_KEYS = frozenset({"format"}).union(*FORMAT_KEYS.values())
# What an objective makes of a format's examples: sources of one mix are all of one kind (a
# preference objective scores pairs, kto labelled completions, sft plain examples).
FORMAT_KIND = {"text": "plain", "instruction": "plain", "chat": "plain",
               "preference": "preference pairs", "kto": "kto rows"}
DataFormat = Literal["text", "instruction", "chat", "preference", "kto"]


class DataSource(Section):
    """One source of a data mix: `data.train: [{path: a.jsonl, weight: 3}, {path: b.jsonl,
    weight: 1, format: instruction}]` (a bare path is `{path: PATH}`). `weight` (default 1,
    train only) is the source's share of each epoch relative to the other weights. The format
    keys below mirror DataSection's (same types and defaults; a test keeps them in step) and
    override the section's for this source only; the keys left out come from the section."""

    path: str = Field(description="a data file: jsonl | json | parquet | csv | saved datasets dir")
    weight: float | None = Field(default=None, ge=0)
    format: DataFormat = "text"
    text_field: str = "text"
    prompt_field: str = "prompt"
    input_field: str | None = None
    response_field: str = "response"
    messages_field: str = "messages"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    completion_field: str = "completion"
    label_field: str = "label"
    roles: dict[str, str] = Field(default_factory=dict)
    prompt_template: str = "{prompt}\n"
    add_eos: bool = True

    @model_validator(mode="before")
    @classmethod
    def _source_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"path": value}
        if not isinstance(value, dict):
            return value
        from peftune.recipe.errors import did_you_mean

        for key in value:
            if key in cls.model_fields:
                continue
            if key in DataSection.model_fields:
                raise ValueError(f"{key} is section-wide: set it under data:, not in a source "
                                 "(a source takes path, weight and format keys)")
            raise ValueError(f"unknown key {key!r}{did_you_mean(key, list(cls.model_fields))}; "
                             "a source takes path, weight and format keys (format, "
                             "text_field, prompt_field, ...)")
        return value

    @field_validator("weight", mode="before")
    @classmethod
    def _weight_is_a_number(cls, value: Any) -> Any:
        # pydantic would read "2" or true as a number; a weight is written as one
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError("expected a number >= 0 (the source's share of an epoch, relative "
                             "to the other weights)")
        return value

    @model_serializer(mode="wrap")
    def _keys_set_only(self, handler: Any) -> dict:
        # a dump (the run's recipe.yaml) holds the keys the source sets: the others are the
        # data section's, which the dump writes in full
        dumped = handler(self)
        kept = {"path"} | (self.model_fields_set & SOURCE_FORMAT_KEYS)
        if self.weight is not None:
            kept.add("weight")
        return {key: value for key, value in dumped.items() if key in kept}

    def own_keys(self) -> dict[str, Any]:
        """The format keys this source sets for itself."""
        return {key: getattr(self, key) for key in SOURCE_FORMAT_KEYS & self.model_fields_set}


class DataSection(Section):
    # a file, or a mix: a list of sources ({path, weight, format keys}) drawn by weight
    train: str | list[DataSource] = Field(
        description="training data: jsonl | json | parquet | csv | saved datasets dir")
    # a file, or a list of sources (each read whole, no weights)
    val: str | list[DataSource] | None = None
    val_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    format: DataFormat = "text"
    text_field: str = "text"
    prompt_field: str = "prompt"
    input_field: str | None = None
    response_field: str = "response"
    messages_field: str = "messages"
    # preference: a prompt with a chosen and a rejected response; kto: a prompt, one
    # completion and a boolean label (true: desirable). Each text a string or chat messages.
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    completion_field: str = "completion"
    label_field: str = "label"
    # chat: message roles (or ShareGPT "from" speakers) renamed to system / user / assistant /
    # tool, e.g. {human: user, bot: assistant}; the usual ShareGPT speakers need no entry
    roles: dict[str, str] = Field(default_factory=dict)
    prompt_template: str = "{prompt}\n"
    max_length: int = Field(default=1024, gt=0)
    # an example longer than max_length keeps its first tokens (right: cut at the end) or its
    # last ones (left: the start of a long prompt goes, the response stays)
    truncation: Literal["right", "left"] = "right"
    packing: bool = True
    add_eos: bool = True
    on_bad_row: Literal["error", "skip"] = "error"
    # at most this many rows read from data.train (from each source of a mix)
    max_examples: int | None = Field(default=None, gt=0)
    select: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _format_of_the_mix(cls, data: Any) -> Any:
        # A mix whose sources all name one format trains that format: it is data.format
        # (which the objective's checks read) unless the section sets one itself.
        if not isinstance(data, dict) or "format" in data or not isinstance(
                data.get("train"), list):
            return data
        named = [s.get("format") if isinstance(s, dict) else None for s in data["train"]]
        if named and None not in named and len(set(named)) == 1:
            data = {**data, "format": named[0]}
        return data

    @field_validator("train")
    @classmethod
    def _train_weights(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("an empty list of sources; give a file or at least one "
                                 "source {path, weight}")
            # weight 1 where a source sets none, written out so the dump says it
            value = [s if s.weight is not None else s.model_copy(update={"weight": 1.0})
                     for s in value]
        return value

    @field_validator("val")
    @classmethod
    def _val_sources(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("an empty list of sources; give a file, a list of sources, or "
                             "null")
        return value

    @property
    def is_mix(self) -> bool:
        return isinstance(self.train, list)

    def sources(self, split: Literal["train", "val"]) -> list[tuple[str, DataSection]]:
        """Each source of `split` as (recipe key, the data section it is read with): a plain
        path is (`data.train`, this section); a source of a list is (`data.train[i]`, this
        section with the source's path as `train` and its own format keys)."""
        value = getattr(self, split)
        if value is None:
            return []
        if isinstance(value, str):
            return [(f"data.{split}", self if split == "train" else self.model_copy(
                update={"train": value, "val": None, "val_ratio": 0.0, "select": None}))]
        return [(f"data.{split}[{i}]", self.model_copy(update={
                    **source.own_keys(), "train": source.path, "val": None, "val_ratio": 0.0,
                    "select": None}))
                for i, source in enumerate(value)]

    def mix_problems(self) -> list[tuple[tuple[Any, ...], str]]:
        """What is wrong with the data mix, as (key path, message): format keys a source's
        format does not read, weights in a validation mix, formats that cannot train
        together, weights that are all 0, selection from a mix."""
        problems: list[tuple[tuple[Any, ...], str]] = []
        listed = [(("data", split, i), source) for split in ("train", "val")
                  if isinstance(getattr(self, split), list)
                  for i, source in enumerate(getattr(self, split))]
        for at, source in listed:
            fmt = self._format_of(source)
            for key in sorted(source.own_keys().keys() - {"format"} - FORMAT_KEYS[fmt]):
                readers = [name for name, keys in FORMAT_KEYS.items() if key in keys]
                problems.append((at + (key,), f"format {fmt} does not read it (only "
                                 f"{', '.join(readers)} do); remove it, or set this source's "
                                 "format"))
            if at[1] == "val" and source.weight is not None:
                problems.append((at + ("weight",), "a validation mix reads each source "
                                 "whole, so it has no weights; remove it"))
        # (where to point, what to call it, format): every source, and data.format, which
        # the objective's checks read and a plain data.train or data.val is read with
        formats = [(at + ("format",), dotted_key(at), self._format_of(source))
                   for at, source in listed]
        formats.append((("data", "format"), "data.format", self.format))
        _, first_name, first = formats[0]
        for at, name, fmt in formats[1:]:
            if FORMAT_KIND[fmt] != FORMAT_KIND[first]:
                problems.append((at, f"{name} is {fmt} ({FORMAT_KIND[fmt]}) and {first_name} "
                                 f"is {first} ({FORMAT_KIND[first]}): an objective scores "
                                 "them differently, so they cannot train together; give "
                                 "every source one kind of rows"))
                break
        if self.is_mix and not any(source.weight for source in self.train):
            problems.append((("data", "train"), "every source's weight is 0, so an epoch "
                             "would draw nothing; give at least one source a weight > 0"))
        if self.is_mix and self.select is not None:
            problems.append((("data", "select"), f"selection picks rows from one pool, and "
                             f"data.train is a mix of {len(self.train)} sources; run `peftune "
                             "select-data` on the pool and give its selected.jsonl as one "
                             "source of the mix"))
        return problems

    def recipe_problems(self, recipe: Any) -> list[tuple[tuple[Any, ...], str]]:
        """mix_problems, and an eval task that would read a validation mix (tasks read one
        file)."""
        problems = self.mix_problems()
        if isinstance(self.val, list):
            problems += [(("eval", "tasks", i, "data"), "required: data.val is a mix of "
                          f"{len(self.val)} sources and an eval task reads one file; name it")
                         for i, task in enumerate(recipe.eval.tasks) if task.data is None]
        return problems

    def _format_of(self, source: DataSource) -> str:
        return source.format if "format" in source.model_fields_set else self.format


def dotted_key(path: tuple[Any, ...]) -> str:
    """('data', 'train', 1) -> 'data.train[1]'."""
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p)
                   for i, p in enumerate(path))


# The keys each training strategy reads besides `name` (a key of another strategy is an error).
STRATEGY_KEYS = {
    "lisa": frozenset({"layers", "interval"}),
    "galore": frozenset({"rank", "update_proj_gap", "scale", "proj_type"}),
    "zo": frozenset({"variant", "eps", "n_samples", "momentum", "uncertainty"}),
    "ist": frozenset({"layers", "interval", "score_interval", "score_trials", "score_layers",
                      "suppression", "score_lr"}),
}
# A key whose default depends on the strategy (filled in before validation, so a dump holds it)
STRATEGY_DEFAULTS = {"ist": {"interval": 1}}
ZO_ADAMU_KEYS = frozenset({"momentum", "uncertainty"})  # read only by variant adamu
# Methods whose own training hooks need what a strategy takes away: zo leaves no gradients
# (these score, grow or regrow by them); ist freezes and unfreezes layers' parameters, which
# would undo these methods' own freezing. (A MethodConfig class flag would be the general
# home for this; the table keeps the check beside the strategies until a second user.)
ZO_NEEDS_GRADIENTS = {
    "adalora": "AdaLoRA allocates rank by gradient sensitivity",
    "aflora": "AFLoRA's freezing score is computed from gradients",
    "increlora": "IncreLoRA grows rank by gradient importance",
    "spiel": "SpIEL regrows its indices by accumulated gradients",
}
IST_FREEZES_ITSELF = {
    "aflora": "AFLoRA freezes its projections progressively",
    "lamda": "LaMDA freezes B part-way through the run",
    "lt-sft": "LT-SFT switches from a dense to a sparse phase",
    "spiel": "SpIEL swaps its probe entries in and out",
}


class StrategySection(Section):
    """`train.strategy`: how a run spends its memory (peftune.train.strategies).

    lisa (Pan et al. 2024; `adapter.method: full`): only `layers` decoder layers, drawn
    anew every `interval` optimizer steps, train at a time, with the embeddings and head.
    galore (Zhao et al. 2024; `adapter.method: full`): the decoder layers' matrices keep Adam
    states of their gradient projected to rank `rank` (subspace recomputed every
    `update_proj_gap` steps, update scaled by `scale`); `train.optimizer` adamw or adamw8bit
    picks galore-torch's optimizer.
    zo (MeZO, Malladi et al. 2023; any method): forward passes only, the SPSA estimate
    `(L(θ+εz) - L(θ-εz))/(2ε)·z` with ε = `eps` and z regenerated from a seed,
    averaged over `n_samples` directions; `variant: adamu` (ZO-AdaMU, Jiang et al. 2023)
    draws z around a momentum of past perturbations (`momentum`, `uncertainty`) and scales
    the step by their second moment (peftune.train.zo).
    ist (Yao et al. 2024; adapter methods): each `interval` steps only the PEFT modules of
    `layers` decoder layers train, drawn by importance; every `score_interval` steps
    `score_trials` draws of `score_layers` layers have their modules' learned change
    scaled by `suppression`, and the loss each draw gives updates the scores at rate
    `score_lr` (peftune.train.ist)."""

    name: Literal["lisa", "galore", "zo", "ist"]
    layers: int = Field(default=2, gt=0)
    interval: int = Field(default=20, gt=0)
    rank: int = Field(default=128, gt=0)
    update_proj_gap: int = Field(default=200, gt=0)
    scale: float = Field(default=0.25, gt=0)
    proj_type: Literal["std", "reverse_std", "right", "left", "full"] = "std"
    # zo: mezo (plain SPSA, MeZO) or adamu (ZO-AdaMU's momentum and uncertainty)
    variant: Literal["mezo", "adamu"] = "mezo"
    eps: float = Field(default=1e-3, gt=0, le=1)  # the perturbation scale ε
    n_samples: int = Field(default=1, gt=0, le=64)  # SPSA directions per optimizer step
    # zo adamu: the weight of the momentum-centred draw in each perturbation (1 - β1), and
    # the variance share α of the zero-centred draw (1 - α around the momentum)
    momentum: float = Field(default=0.5, ge=0, lt=1)
    uncertainty: float = Field(default=0.5, gt=0, le=1)
    # ist: importance scoring every score_interval steps, score_trials suppressed draws of
    # score_layers layers (null: half the layers) at response factor suppression
    score_interval: int = Field(default=10, gt=0)
    score_trials: int = Field(default=3, ge=2, le=16)
    score_layers: int | None = Field(default=None, gt=0)
    suppression: float = Field(default=0.25, ge=0, lt=1)
    score_lr: float = Field(default=10.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _strategy_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") in STRATEGY_DEFAULTS:
            data = {**STRATEGY_DEFAULTS[data["name"]], **data}
        return data

    @field_validator(*sorted(set().union(*STRATEGY_KEYS.values())))
    @classmethod
    def _own_strategy(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.data.get("name")
        if name is not None and info.field_name not in STRATEGY_KEYS[name]:
            owners = [s for s, keys in STRATEGY_KEYS.items() if info.field_name in keys]
            keys = ", ".join(sorted(STRATEGY_KEYS[name]))
            raise ValueError(f"strategy {name} has no such key; only strategy "
                             f"{' and '.join(owners)} reads it (strategy {name}'s keys: name, "
                             f"{keys})")
        if info.field_name in ZO_ADAMU_KEYS and info.data.get("variant", "mezo") != "adamu":
            raise ValueError("is read only by strategy zo with variant: adamu (ZO-AdaMU); set "
                             "variant: adamu or remove this key")
        return value

    @model_serializer(mode="wrap")
    def _own_keys_only(self, handler: Any) -> dict:
        # a dump (the run's recipe.yaml) holds the strategy's own keys, so that it loads back
        own = STRATEGY_KEYS[self.name] | {"name"}
        if self.name == "zo" and self.variant != "adamu":
            own = own - ZO_ADAMU_KEYS
        return {key: value for key, value in handler(self).items() if key in own}

    def recipe_problems(self, recipe: Any) -> list[tuple[tuple[str, ...], str]]:
        where = ("train", "strategy", "name")
        method, train = recipe.adapter.method, recipe.train
        if self.name == "zo":
            return self._zo_problems(recipe)
        if self.name == "ist":
            from peftune.adapters.registry import get_method

            if get_method(method).trains_base_weights:
                return [(where, f"strategy ist draws the PEFT modules of decoder layers, and "
                         f"adapter.method {method} trains the base's own weights; for a full "
                         "fine-tune use strategy lisa")]
            if method in IST_FREEZES_ITSELF:
                return [(where, f"strategy ist freezes and unfreezes layers' parameters, and "
                         f"{IST_FREEZES_ITSELF[method]}; use another method or no strategy")]
            return []
        if method != "full":
            return [(where, f"strategy {self.name} trains the base's own weights and needs "
                     f"adapter.method: full, got {method}")]
        if self.name == "galore" and recipe.quant.method != "none":
            return [(("quant", "method"), f"strategy galore updates every weight of the base and "
                     f"cannot train over a {recipe.quant.method} base; use quant.method: none")]
        if self.name == "galore" and train.optimizer in ("paged_adamw", "lion"):
            kind = "paged" if train.optimizer == "paged_adamw" else "Lion"
            return [(("train", "optimizer"), f"strategy galore has no {kind} optimizer; use "
                     "train.optimizer: adamw or adamw8bit")]
        if self.name == "galore" and train.loraplus_ratio is not None:
            return [(("train", "loraplus_ratio"), "strategy galore and LoRA+ do not combine; "
                     "remove one")]
        return []

    def _zo_problems(self, recipe: Any) -> list[tuple[tuple[str, ...], str]]:
        """What a forward-only step cannot do: gradients are never computed."""
        method, train = recipe.adapter.method, recipe.train
        if train.gradient_checkpointing:
            return [(("train", "gradient_checkpointing"), "strategy zo runs forward passes only "
                     "(no backward pass, no stored activations), so gradient checkpointing has "
                     "nothing to save; set it to false")]
        if method in ZO_NEEDS_GRADIENTS:
            return [(("train", "strategy", "name"), f"strategy zo computes no gradients, and "
                     f"{ZO_NEEDS_GRADIENTS[method]}; use another method (lora, ...) or no "
                     "strategy")]
        if self.variant == "adamu" and self.n_samples != 1:
            return [(("train", "strategy", "n_samples"), "variant adamu takes one perturbation "
                     "per step (the next is drawn around it); use n_samples: 1 or variant: "
                     "mezo")]
        if train.optimizer != "adamw":
            return [(("train", "optimizer"), f"strategy zo is its own optimizer (SPSA steps at "
                     f"train.lr), so train.optimizer: {train.optimizer} would not run; remove "
                     "it")]
        if train.loraplus_ratio is not None:
            return [(("train", "loraplus_ratio"), "strategy zo steps every parameter at "
                     "train.lr; remove train.loraplus_ratio")]
        if train.precision == "fp16":
            return [(("train", "precision"), "fp16 loss scaling works on gradients, and "
                     "strategy zo computes none; use bf16 or fp32")]
        return []


# The keys each objective reads besides `name` (a key of another objective is an error);
# peftune.train.objectives holds the formulas, METHODS.md section 7 the papers.
OBJECTIVE_KEYS = {
    "sft": frozenset(),
    "dpo": frozenset({"beta", "label_smoothing", "reference"}),
    "ln-dpo": frozenset({"beta", "label_smoothing", "reference"}),
    "ipo": frozenset({"beta", "reference"}),
    "orpo": frozenset({"lambda"}),
    "simpo": frozenset({"beta", "gamma"}),
    "kto": frozenset({"beta", "desirable_weight", "undesirable_weight", "reference"}),
}
# `beta` when a recipe leaves it out: each paper's usual value (per-token averaged log-probs,
# as in ln-dpo and simpo, are ~1/length of summed ones and take a larger beta)
OBJECTIVE_BETA = {"dpo": 0.1, "ln-dpo": 1.0, "ipo": 0.1, "simpo": 2.0, "kto": 0.1}
PAIRED_OBJECTIVES = frozenset({"dpo", "ln-dpo", "ipo", "orpo", "simpo"})


class ObjectiveSection(Section):
    """`train.objective`: the loss a run minimises, `NAME` or `{name: NAME, key: value}`.
    sft: next-token cross-entropy (the default). dpo, ln-dpo, ipo, orpo, simpo train on
    `data.format: preference` pairs, kto on `data.format: kto` rows (peftune.train.objectives).
    `reference` (dpo, ln-dpo, ipo, kto): `auto` (the base with the adapter off where that is
    the starting model, else `precomputed`), `adapter_off`, `precomputed` (the starting model's
    log-probs of every pair, computed once before the first step), or a model path."""

    model_config = ConfigDict(populate_by_name=True)

    name: Literal["sft", "dpo", "ln-dpo", "ipo", "orpo", "simpo", "kto"] = "sft"
    beta: float | None = Field(default=None, gt=0, validate_default=True)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    reference: str = "auto"
    lambda_: float = Field(default=0.1, gt=0, alias="lambda")
    gamma: float = Field(default=0.5, ge=0)
    desirable_weight: float = Field(default=1.0, gt=0)
    undesirable_weight: float = Field(default=1.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _own_objective(cls, value: Any) -> Any:
        if not isinstance(value, dict) or value.get("name") not in OBJECTIVE_KEYS:
            return value
        name = value["name"]
        own = OBJECTIVE_KEYS[name]
        for key in value:
            if key != "name" and key not in own:
                owners = [n for n, keys in OBJECTIVE_KEYS.items() if key in keys]
                theirs = f"; only {', '.join(owners)} read it" if owners else ""
                keys = ", ".join(sorted(own)) or "none"
                raise ValueError(f"objective {name} has no key {key!r} (its keys: {keys}){theirs}")
        return value

    @field_validator("beta")
    @classmethod
    def _beta(cls, value: float | None, info: ValidationInfo) -> float | None:
        return OBJECTIVE_BETA.get(info.data.get("name")) if value is None else value

    @field_validator("reference")
    @classmethod
    def _reference(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected auto, adapter_off, precomputed or a model path")
        return value

    @model_serializer(mode="wrap")
    def _own_keys_only(self, handler: Any) -> dict:
        # a dump (the run's recipe.yaml) holds the objective's own keys, so that it loads back
        own = OBJECTIVE_KEYS[self.name] | {"name"}
        dumped = handler(self)
        dumped["lambda"] = dumped.pop("lambda_", self.lambda_)
        return {key: value for key, value in dumped.items() if key in own}

    @property
    def paired(self) -> bool:
        return self.name in PAIRED_OBJECTIVES

    @property
    def uses_reference(self) -> bool:
        return "reference" in OBJECTIVE_KEYS[self.name]

    def recipe_problems(self, recipe: Any) -> list[tuple[tuple[str, ...], str]]:
        fmt = recipe.data.format
        where = ("train", "objective")
        if self.paired and fmt != "preference":
            return [(where, f"objective {self.name} trains on chosen/rejected pairs and needs "
                     f"data.format: preference, got {fmt}" + (
                         "; use objective kto for unpaired rows" if fmt == "kto" else ""))]
        if self.name == "kto" and fmt != "kto":
            return [(where, f"objective kto trains on unpaired rows (prompt, completion, label) "
                     f"and needs data.format: kto, got {fmt}" + (
                         "; use objective dpo (or ln-dpo, ipo, orpo, simpo) for pairs"
                         if fmt == "preference" else ""))]
        if self.name == "sft" and fmt in ("preference", "kto"):
            return [(("data", "format"), f"data.format: {fmt} is for preference objectives; set "
                     "train.objective (dpo, ln-dpo, ipo, orpo, simpo for pairs, kto for "
                     "labelled rows)")]
        if self.uses_reference and self.reference == "adapter_off" and (
                recipe.adapter.method in ("full", "freeze")):
            return [(where + ("reference",), f"adapter.method {recipe.adapter.method} has no "
                     "adapter to switch off; use reference: precomputed (or auto)")]
        return []


class TrainSection(Section):
    max_steps: int | None = Field(default=None, gt=0)
    epochs: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    lr: float = Field(default=2.0e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0.0, lt=1.0)
    warmup_steps: int | None = Field(default=None, ge=0)
    # lion (Chen et al. 2023): one moment per parameter, half of AdamW's optimizer state;
    # it wants a 3-10x smaller train.lr than AdamW (and a 3-10x larger weight_decay)
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw", "lion"] = "adamw"
    # LoRA+ (Hayou et al. 2024): B's learning rate = ratio x lr (the paper suggests 16)
    loraplus_ratio: float | None = Field(default=None, gt=0)
    adam_betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    # Lion's β1 (interpolation of the update's sign) and β2 (the moment's decay); the
    # paper's defaults. Read only with optimizer: lion, which in turn reads no adam_betas.
    lion_betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.99)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # true: recompute every decoder layer in the backward pass; N: every N-th layer (memory
    # for speed in steps: docs/memory.md has measured figures); false: none
    gradient_checkpointing: bool | int = False
    # the output head applied in chunks to target positions only (no full logits); false:
    # the plain full-logits loss (the same numbers, more memory)
    chunked_loss: bool = True
    seed: int = 0
    log_every: int = Field(default=10, gt=0)
    eval_every: int | None = Field(default=None, gt=0)
    save_every: int | None = Field(default=None, gt=0)
    keep_checkpoints: int = Field(default=2, gt=0)
    # a training strategy: {name: lisa | galore, ...} for adapter.method: full, {name: ist,
    # ...} for adapter methods, {name: zo, ...} (forward passes only) for either
    strategy: StrategySection | None = None
    # the loss: sft (next-token), or a preference objective (dpo, ln-dpo, ipo, orpo, simpo, kto)
    objective: ObjectiveSection = ObjectiveSection()

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("adam_betas", "lion_betas", mode="before")
    @classmethod
    def _betas(cls, value: Any, info: ValidationInfo) -> Any:
        # one line for the key as a whole (pydantic's own would be "adam_betas[1]: required
        # key is missing" for [0.9]): what it takes, an example, and what was given
        numbers = isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0 <= beta < 1
            for beta in value)
        if not numbers:
            which, example = (("Adam", "[0.9, 0.999]") if info.field_name == "adam_betas"
                              else ("Lion", "[0.9, 0.99]"))
            raise ValueError(f"expected two numbers in [0, 1) ({which}'s beta1 and beta2), "
                             f"e.g. {example}")
        return value

    @field_validator("adam_betas", "lion_betas")
    @classmethod
    def _betas_of_the_optimizer(cls, value: tuple, info: ValidationInfo) -> tuple:
        # (a resolved recipe holds both at their defaults, so only a changed pair is refused)
        optimizer = info.data.get("optimizer")
        lion = info.field_name == "lion_betas"
        if optimizer is None or tuple(value) == cls.model_fields[info.field_name].default:
            return value
        if lion and optimizer != "lion":
            raise ValueError(f"is read only with train.optimizer: lion (got {optimizer}); "
                             "use train.adam_betas, or set train.optimizer: lion")
        if not lion and optimizer == "lion":
            raise ValueError("train.optimizer: lion does not read Adam's betas; set "
                             "train.lion_betas (default [0.9, 0.99]) instead")
        return value

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing(cls, value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, int) and value >= 0):
            return value
        raise ValueError("expected true, false, or N >= 1 (checkpoint every N-th decoder layer)")

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up steps of a run of `total_steps` (train and validate use this one rule)."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return int(self.warmup_ratio * total_steps)


class OutputSection(Section):
    """Where the run is written; metrics.jsonl always, and with `report_to` also TensorBoard
    event files (`dir/tensorboard`) and an MLflow run (peftune.train.trackers)."""

    dir: str = "runs/my-run"
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="also log the metrics to tensorboard and/or mlflow")
    mlflow_tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
        "sqlite:///mlflow.db beside the run directory)")
    mlflow_experiment: str = Field(default="peftune", min_length=1)

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _installed(cls, value: list[str]) -> list[str]:
        from peftune.recipe.extras import missing_tracker

        for name in dict.fromkeys(value):
            if value.count(name) > 1:
                raise ValueError(f"{name} is listed {value.count(name)} times; list it once")
            if (problem := missing_tracker(name)) is not None:
                raise ValueError(problem)
        return value

    @field_validator("mlflow_tracking_uri", "mlflow_experiment")
    @classmethod
    def _mlflow_reads_it(cls, value: str | None, info: ValidationInfo) -> str | None:
        # (report_to is missing from info.data where it failed its own validation)
        default = cls.model_fields[info.field_name].default  # a resolved recipe has them all
        if value != default and "mlflow" not in info.data.get("report_to", ["mlflow"]):
            raise ValueError("is read only with output.report_to: [mlflow]; add mlflow there "
                             "or remove this key")
        return value


# The keys each eval task reads besides the shared ones (a key of another task is an error).
EVAL_TASK_KEYS = {
    "perplexity": frozenset({"format", "text_field", "prompt_field", "input_field",
                             "response_field", "messages_field", "roles", "prompt_template",
                             "add_eos", "window", "stride"}),
    "choice": frozenset({"format", "prompt_field", "prompt_template", "choices_field",
                         "answer_field"}),
    "generate": frozenset({"format", "prompt_field", "input_field", "response_field",
                           "messages_field", "roles", "prompt_template", "max_new_tokens",
                           "temperature", "top_p", "seed", "stop", "metrics", "normalize",
                           "answer_regex"}),
    "preference": frozenset({"prompt_field", "chosen_field", "rejected_field", "roles",
                             "prompt_template", "add_eos", "max_length", "truncation", "beta"}),
}


EVAL_SHARED_KEYS = frozenset({"task", "name", "data", "max_examples", "batch_size",
                               "on_bad_row"})


class EvalTask(Section):
    """One evaluation task of `peftune eval` or a recipe's `eval:` block (peftune.evaluate).

    Shared keys first; each task's own keys follow and are accepted only with that task.
    The data keys have the data section's names and defaults (a test keeps them in step)."""

    task: Literal["perplexity", "choice", "generate", "preference"]
    name: str | None = Field(default=None, description="the task's name in the report")
    data: str | None = Field(default=None, description="jsonl | json | parquet | csv | saved "
                             "datasets dir (a recipe's eval: block defaults to data.val)")
    max_examples: int | None = Field(default=None, gt=0)
    batch_size: int | None = Field(default=None, gt=0)
    on_bad_row: Literal["error", "skip"] = "error"
    format: Literal["text", "instruction", "chat"] = "text"
    text_field: str = "text"
    prompt_field: str = "prompt"
    input_field: str | None = None
    response_field: str = "response"
    messages_field: str = "messages"
    roles: dict[str, str] = Field(default_factory=dict)
    prompt_template: str = "{prompt}\n"
    add_eos: bool = True
    # perplexity: tokens per forward pass (default: the model's context, at most 1024) and
    # the step between windows of a longer text (default: half a window)
    window: int | None = Field(default=None, gt=1)
    stride: int | None = Field(default=None, gt=0)
    # choice
    choices_field: str = "choices"
    answer_field: str = "answer"
    # generate
    max_new_tokens: int = Field(default=32, gt=0)
    temperature: float = Field(default=0.0, ge=0.0)  # 0: greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = 0
    stop: list[str] = Field(default_factory=list)
    metrics: list[Literal["exact_match", "contains", "regex_match"]] = ["exact_match"]
    normalize: list[Literal["strip", "lower", "whitespace", "punctuation", "articles"]] = ["strip"]
    # regex_match: the last match in prediction and reference (group 1 if the pattern has
    # one) is compared; the default finds the final number (GSM8K-style answers)
    answer_regex: str = r"-?\d[\d,]*(?:\.\d+)?"
    # preference: prompt / chosen / rejected rows as data.format: preference reads them, each
    # pair cut to max_length tokens a side (default: the model's context) as data.truncation
    # says; beta scales the reward β·(log π - log π_ref) (default: the β of the run's
    # preference objective, else 0.1)
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    max_length: int | None = Field(default=None, gt=1)
    truncation: Literal["right", "left"] = "right"
    beta: float | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _generate_reads_pairs(cls, data: Any) -> Any:
        # generation needs a prompt and a reference: instruction rows unless told otherwise
        if isinstance(data, dict) and data.get("task") == "generate" and "format" not in data:
            data = {**data, "format": "instruction"}
        return data

    @field_validator(*sorted(set().union(*EVAL_TASK_KEYS.values())))
    @classmethod
    def _own_task(cls, value: Any, info: ValidationInfo) -> Any:
        task = info.data.get("task")
        if task is not None and info.field_name not in EVAL_TASK_KEYS[task]:
            owners = [t for t, keys in EVAL_TASK_KEYS.items() if info.field_name in keys]
            raise ValueError(f"task {task} has no such key; only task {' and '.join(owners)} "
                             "reads it")
        return value

    @model_validator(mode="after")
    def _task_checks(self) -> EvalTask:
        if self.task == "generate" and self.format == "text":
            raise ValueError("task generate needs prompt -> reference pairs: set format: "
                             "instruction (prompt_field, response_field) or chat")
        if self.window is not None and self.stride is not None and self.stride >= self.window:
            raise ValueError(f"stride {self.stride} must be less than window {self.window} "
                             "(each window keeps window - stride tokens of context)")
        if "regex_match" in self.metrics:
            import re

            try:
                re.compile(self.answer_regex)
            except re.error as err:
                raise ValueError(f"answer_regex is not a valid regular expression: {err}") from None
        return self

    @model_serializer(mode="wrap")
    def _own_keys_only(self, handler: Any) -> dict:
        # A dump (a run's recipe.yaml, a report) holds the task's own keys only, so that it
        # loads back: another task's key is an error.
        own = EVAL_TASK_KEYS[self.task] | EVAL_SHARED_KEYS
        return {key: value for key, value in handler(self).items() if key in own}

    @property
    def label(self) -> str:
        return self.name or self.task


class EvalSection(Section):
    """Evaluation tasks: `peftune eval --config FILE` reads a file with this section, and a
    training recipe's `eval:` block runs them on the trained model at the end of the run."""

    tasks: list[EvalTask] = Field(default_factory=list)
    batch_size: int = Field(default=8, gt=0)

    @model_validator(mode="after")
    def _unique_names(self) -> EvalSection:
        labels = [task.label for task in self.tasks]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"two tasks are named {twice[0]!r}; give each a distinct name")
        return self


class Recipe(Section):
    """A fully resolved recipe. `extends:` has been applied before validation."""

    model: ModelSection
    quant: QuantSection = QuantSection()
    # Becomes the method's MethodConfig after loading; SerializeAsAny makes model_dump()
    # write that config's own keys (r, alpha, ...) rather than only AdapterSection's.
    adapter: SerializeAsAny[AdapterSection] = AdapterSection()
    data: DataSection
    train: TrainSection = TrainSection()
    output: OutputSection = OutputSection()
    # Run on the trained model at the end of training; left out of a dump while empty.
    eval: EvalSection = Field(default_factory=EvalSection, exclude_if=lambda e: not e.tasks)

    @field_validator("model", mode="before")
    @classmethod
    def _model_as_path(cls, value: Any) -> Any:
        # `model: ./models/tiny` is shorthand for `model: {path: ./models/tiny}`.
        return {"path": value} if isinstance(value, str) else value


def cross_field_problems(recipe: Recipe) -> list[tuple[tuple[str, ...], str]]:
    """Checks that involve several sections: (key path, message) for each problem found."""
    from peftune.adapters.registry import get_method

    problems = []
    spec = get_method(recipe.adapter.method)
    if recipe.quant.method != "none" and recipe.quant.method not in spec.quantized:
        over = sorted(spec.quantized)
        problems.append((
            ("quant", "method"),
            f"{recipe.quant.method} cannot be combined with adapter.method: {spec.name} "
            f"({spec.unquantized_because}); use quant.method: "
            f"{' or '.join(['none', *over])}, or a method that trains over "
            f"{recipe.quant.method}, such as lora",
        ))
    problems += recipe.adapter.recipe_problems(recipe)
    problems += recipe.quant.recipe_problems(recipe)
    if recipe.train.loraplus_ratio is not None and not getattr(recipe.adapter, "has_lora_b", False):
        problems.append((
            ("train", "loraplus_ratio"),
            f"LoRA+ raises the learning rate of LoRA's B matrices, and adapter.method "
            f"{spec.name} has none; remove it or use a LoRA-family method (lora, dora, ...)",
        ))
    if recipe.train.strategy is not None:
        problems += recipe.train.strategy.recipe_problems(recipe)
    problems += recipe.train.objective.recipe_problems(recipe)
    problems += recipe.data.recipe_problems(recipe)
    if recipe.data.val is not None and recipe.data.val_ratio > 0:
        problems.append((
            ("data", "val_ratio"),
            "give either data.val (a file) or data.val_ratio, not both",
        ))
    return problems
