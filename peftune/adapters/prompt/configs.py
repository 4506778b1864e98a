"""Recipe configs of the virtual-token methods (torch-free): prompt tuning, prefix tuning
and P-tuning, through peft, applied like peft's other tuners (`peftune.adapters.tuners`).
They leave the base's weights alone and prepend trained vectors to every sequence, so they
are not mergeable and need unpacked rows (a packed row holds several examples, and the
virtual tokens would only precede the first)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from peftune.adapters.registry import BNB_4BIT, INT4, INT8, MethodConfig, MethodSpec, register


class VirtualTokenConfig(MethodConfig):
    num_virtual_tokens: int = Field(default=20, gt=0)

    peft_class: ClassVar[str] = ""

    def peft_kwargs(self) -> dict:
        return {}

    def peft_config(self, **_: Any) -> Any:
        import peft

        return getattr(peft, self.peft_class)(task_type="CAUSAL_LM",
                                              num_virtual_tokens=self.num_virtual_tokens,
                                              **self.peft_kwargs())

    def recipe_problems(self, recipe: Any) -> list[tuple[tuple[str, ...], str]]:
        if recipe.data.packing:
            return [(("data", "packing"), f"adapter.method {self.method} prepends virtual "
                     "tokens to each sequence, which needs one example per row; set "
                     "data.packing: false")]
        return []


class PromptConfig(VirtualTokenConfig):
    """Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient
    Prompt Tuning", arXiv:2104.08691): `num_virtual_tokens` (20) trained input embeddings
    prepended to every sequence; `init: text` starts them from the embeddings of
    `init_text` (repeated or cut to length), `random` from random vectors."""

    method: Literal["prompt"] = "prompt"
    init: Literal["random", "text"] = "random"
    init_text: str | None = None

    peft_class: ClassVar[str] = "PromptTuningConfig"

    @model_validator(mode="after")
    def _text(self) -> PromptConfig:
        if self.init == "text" and not self.init_text:
            raise ValueError("adapter.init: text needs adapter.init_text (the words to start from)")
        if self.init == "random" and self.init_text is not None:
            raise ValueError("adapter.init_text is only used with adapter.init: text")
        return self

    def peft_kwargs(self) -> dict:
        if self.init == "text":
            return dict(prompt_tuning_init="TEXT", prompt_tuning_init_text=self.init_text)
        return dict(prompt_tuning_init="RANDOM")

    def peft_config(self, *, tokenizer: Any = None, **_: Any) -> Any:
        from peft import PromptTuningConfig

        text = {}
        if self.init == "text":  # peft tokenizes init_text with the model's own tokenizer
            text = dict(tokenizer_name_or_path=getattr(tokenizer, "name_or_path", None))
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.num_virtual_tokens,
                                  **self.peft_kwargs(), **text)

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        return self.num_virtual_tokens * model["hidden"]


class PrefixConfig(VirtualTokenConfig):
    """Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
    Generation", arXiv:2101.00190): trained keys and values for `num_virtual_tokens` (20)
    positions in every attention layer; `projection: true` reparametrises them through an
    MLP of width `encoder_hidden_size`, as the paper does for stability."""

    method: Literal["prefix"] = "prefix"
    projection: bool = False
    encoder_hidden_size: int | None = Field(default=None, gt=0)

    peft_class: ClassVar[str] = "PrefixTuningConfig"

    def peft_kwargs(self) -> dict:
        kwargs: dict = dict(prefix_projection=self.projection)
        if self.encoder_hidden_size is not None:
            kwargs["encoder_hidden_size"] = self.encoder_hidden_size
        return kwargs

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        if self.projection:
            return None
        return self.num_virtual_tokens * model["layers"] * 2 * model["kv_dim"]


class PtuningConfig(VirtualTokenConfig):
    """P-tuning (Liu et al. 2021, "GPT Understands, Too", arXiv:2103.10385): virtual
    tokens produced by a small prompt encoder (`encoder_type` MLP or LSTM, width
    `encoder_hidden_size`, default the model's hidden size)."""

    method: Literal["ptuning"] = "ptuning"
    encoder_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: int | None = Field(default=None, gt=0)
    encoder_num_layers: int = Field(default=2, gt=0)
    encoder_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    peft_class: ClassVar[str] = "PromptEncoderConfig"

    @model_validator(mode="after")
    def _lstm_only(self) -> PtuningConfig:
        if self.encoder_type == "MLP":
            unused = [k for k in ("encoder_num_layers", "encoder_dropout") if k in self.model_fields_set]
            if unused:
                raise ValueError(f"adapter.{unused[0]} only applies to encoder_type: LSTM (peft's "
                                 "MLP encoder always has 3 layers and no dropout)")
        return self

    def peft_kwargs(self) -> dict:
        kwargs: dict = dict(encoder_reparameterization_type=self.encoder_type,
                            encoder_num_layers=self.encoder_num_layers,
                            encoder_dropout=self.encoder_dropout)
        if self.encoder_hidden_size is not None:
            kwargs["encoder_hidden_size"] = self.encoder_hidden_size
        return kwargs

    def estimate_trainable(self, layers: list[Any], model: dict) -> int | None:
        if self.encoder_type != "MLP":
            return None
        hidden = model["hidden"]
        width = self.encoder_hidden_size or hidden
        # the embedding, then Linear(h, w), Linear(w, w), Linear(w, h), each with a bias
        return (self.num_virtual_tokens * hidden + (hidden + 1) * width + (width + 1) * width
                + (width + 1) * hidden)


_ANY_BASE = BNB_4BIT | INT8 | INT4
for _name, _config, _description, _paper in (
    ("prompt", PromptConfig, "trained soft-prompt embeddings prepended to the input",
     "Lester et al. 2021, arXiv:2104.08691"),
    ("prefix", PrefixConfig, "trained keys and values prepended in every attention layer",
     "Li & Liang 2021, arXiv:2101.00190"),
    ("ptuning", PtuningConfig, "virtual tokens from a trained prompt encoder (MLP/LSTM)",
     "Liu et al. 2021, arXiv:2103.10385"),
):
    register(MethodSpec(
        name=_name, config=_config, apply="peftune.adapters.tuners.model:apply_tuner",
        description=_description, paper=_paper, mergeable=False, exports_plain_lora=False,
        quantized=_ANY_BASE,
    ))
