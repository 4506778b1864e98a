"""Calibration for data-driven inits (CorDA, LoRA-GA, EVA, LoRA-SB): the `adapter.calibration`
keys, and running the model over the calibration batches.

The batches are padded micro-batches of the recipe's own data (input_ids, attention_mask,
labels), built by the training setup from `adapter.calibration`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Calibration(BaseModel):
    """`adapter.calibration`: the examples a data-driven init runs the model on."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    examples: int = Field(default=64, gt=0, description="rows taken from the data")
    batch_size: int = Field(default=4, gt=0)
    data: str | None = Field(default=None, description="a data file in data.format; "
                                                       "default: data.train")


MODEL_KEYS = ("input_ids", "attention_mask", "labels")


def on_device(model: Any, batches: list[dict]) -> list[dict]:
    device = next(model.parameters()).device
    return [{k: batch[k].to(device) for k in MODEL_KEYS if k in batch} for batch in batches]


def forward_each_example(model: Any, batches: list[dict]) -> None:
    """One forward per example without its padding (CorDA's covariance hooks need batch 1)."""
    import torch

    with torch.no_grad():
        for batch in on_device(model, batches):
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                model(input_ids=ids[mask.bool()][None], use_cache=False)


def accumulate_gradients(model: Any, batches: list[dict]) -> None:
    """Backward of the mean next-token loss of each batch (LoRA-GA's gradient estimate)."""
    for batch in on_device(model, batches):
        model(**batch, use_cache=False).loss.backward()
