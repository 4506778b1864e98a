"""The `select:` section: which selector, which files, and each selector's own keys.

One pydantic model holds the keys every selector shares and the keys of each method; keys
that belong to the other method are rejected (`select.compressor: only for method zipfit`),
so a misplaced key is an error, never silently ignored. The same model validates a
stand-alone `select:` block (`peftune select-data`) and a training recipe's `data.select`
(where the pool is `data.train` and the text fields come from the `data:` section).
Torch-free.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from peftune.data.formats import prompt_template_problem
from peftune.recipe.schema import Section

DSIR_KEYS = frozenset({"buckets", "ngrams", "hash", "pseudo_count", "target_weights",
                       "sampling", "length_normalize"})
ZIPFIT_KEYS = frozenset({"compressor", "level", "target_sample"})
# Keys of a stand-alone selection that a training recipe's data.select cannot have.
TRAINING_FORBIDDEN = {
    "pool": "the pool of data.select is data.train; remove this key",
    "out": "data.select's output is cached by peftune (PEFTUNE_CACHE); remove this key, or "
           "run peftune select-data to choose where the selection goes",
}
_KEYS = {"dsir": DSIR_KEYS, "zipfit": ZIPFIT_KEYS}
# Defaults per compressor: gzip/zlib level 1 scored best in the ZIP-FIT paper's ablation;
# lz4's 0 is its fast mode (the reference's default); zstd's 1 is its fastest positive level.
DEFAULT_LEVEL = {"gzip": 1, "zlib": 1, "lz4": 0, "zstd": 1}
LEVEL_RANGE = {"gzip": (1, 9), "zlib": (1, 9), "lz4": (0, 16), "zstd": (1, 22)}


class SelectConfig(Section):
    """Select `k` rows of a pool whose text resembles a target sample.

    Shared keys; DSIR's keys (Xie et al. 2023) and ZIP-FIT's (Obbad et al. 2024) follow,
    each accepted only with its method.
    """

    method: Literal["dsir", "zipfit"]
    pool: list[str] = Field(default_factory=list, description="files to select from")
    target: list[str] = Field(default_factory=list, description="files of the target sample")
    k: int = Field(gt=0, description="how many pool rows to keep")
    out: str | None = Field(default=None, description="output directory")
    seed: int = Field(default=0, ge=0)
    num_proc: int = Field(default=1, ge=0, description="worker processes; 0 = every core")
    # The data section's text keys, same names and defaults (a test keeps them in step), so
    # data.select can inherit them and a stand-alone selection reads rows like training does.
    # What text is scored: `text_field` as is (format text), or the whole example rendered
    # (format instruction: prompt template + response; chat: one `role: content` line each).
    format: Literal["text", "instruction", "chat"] = "text"
    text_field: str = "text"
    prompt_field: str = "prompt"
    input_field: str | None = None
    response_field: str = "response"
    messages_field: str = "messages"
    prompt_template: str = "{prompt}\n"
    add_eos: ClassVar[bool] = False  # read by the instruction format; no EOS is scored
    target_text_field: str | None = Field(
        default=None, description="score this field of the target rows (default: as the pool)")
    label_field: str | None = Field(default=None, description="count selected rows per label")
    min_length: int = Field(default=0, ge=0,
                            description="skip pool rows with fewer word-punct tokens")
    on_bad_row: Literal["error", "skip"] = Field(
        default="error", description="a pool row that cannot be read: stop, or leave it out")

    # DSIR
    buckets: int = Field(default=10_000, ge=2, le=2**32)
    ngrams: int = Field(default=2, ge=1, le=3, description="1 = unigrams, 2 = + bigrams, ...")
    hash: Literal["sha256", "crc32"] = Field(
        default="sha256", description="sha256 = the reference package's buckets exactly")
    pseudo_count: float = Field(default=0.0, ge=0.0, description="Laplace count for the target")
    target_weights: list[float] | None = Field(
        default=None, description="one target model per file, k split by these proportions")
    sampling: Literal["gumbel", "top_k"] = "gumbel"
    length_normalize: bool = False

    # ZIP-FIT
    compressor: Literal["gzip", "zlib", "lz4", "zstd"] = "gzip"
    level: int | None = None
    target_sample: int | None = Field(default=None, gt=0)

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, value: str, info: ValidationInfo) -> str:
        problem = prompt_template_problem(value, info.data.get("input_field"))
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("pool", "target", mode="before")
    @classmethod
    def _one_file_or_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator(*sorted(DSIR_KEYS | ZIPFIT_KEYS))
    @classmethod
    def _own_method(cls, value: Any, info: ValidationInfo) -> Any:
        method = info.data.get("method")
        if method is not None and info.field_name not in _KEYS[method]:
            other = "zipfit" if method == "dsir" else "dsir"
            raise ValueError(f"only method {other} has this key (remove it, or set "
                             f"method: {other})")
        return value

    @field_validator("level")
    @classmethod
    def _level_in_range(cls, value: int | None, info: ValidationInfo) -> int | None:
        compressor = info.data.get("compressor", "gzip")
        if value is None or compressor is None:
            return value
        if value == 0 and compressor in ("gzip", "zlib"):
            raise ValueError(f"level 0 makes {compressor} store the text without compressing "
                             "it, so every score would measure length, not content; use level "
                             "1 (the default) or higher")
        low, high = LEVEL_RANGE[compressor]
        if not low <= value <= high:
            raise ValueError(f"{compressor} levels are {low}..{high}")
        return value

    @field_validator("target_weights")
    @classmethod
    def _one_weight_per_target(cls, value: list[float] | None,
                               info: ValidationInfo) -> list[float] | None:
        if value is None:
            return value
        if any(w < 0 for w in value) or sum(value) <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        targets = info.data.get("target") or []
        if targets and len(value) != len(targets):
            raise ValueError(f"give one weight per target file ({len(targets)} files)")
        return value

    @property
    def shortest(self) -> int:
        """Fewest words a selectable row has: min_length, and at least one (a row without
        words has nothing to score)."""
        return max(self.min_length, 1)

    @property
    def compression_level(self) -> int:
        return DEFAULT_LEVEL[self.compressor] if self.level is None else self.level

    def method_keys(self) -> dict:
        """The keys that change this method's scores (for reports and cache keys)."""
        own = DSIR_KEYS if self.method == "dsir" else ZIPFIT_KEYS
        values = {key: getattr(self, key) for key in sorted(own)}
        if self.method == "zipfit":
            values["level"] = self.compression_level
        return values
