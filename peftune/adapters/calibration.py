"""Running the model over calibration batches for data-driven inits (CorDA, LoRA-GA, EVA).

The batches are padded micro-batches of the recipe's own data (input_ids, attention_mask,
labels), built by the training setup from `adapter.calibration`.
"""

from __future__ import annotations

from typing import Any

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
