"""The reference model of dpo, ln-dpo, ipo and kto, with no second model in memory.

The reference is the model training starts from. It is had in one of two ways:
- `adapter_off`: the policy itself with its adapter switched off (peft's
  `disable_adapter()`), one extra forward without gradients per micro-batch. Exact where
  switching the adapter off gives the starting model: adapters whose update starts at zero
  (LoRA, DoRA, IA³, ...), not those whose init moves part of W into the adapter (PiSSA,
  LoRA-GA, LoftQ) nor virtual tokens.
- `precomputed`: every training and validation example's log π_ref(y|x), computed once
  before the first step (no gradients, dropout off) and looked up by example during
  training. It serves every method, full fine-tuning included; a resumed run computes the
  same numbers again from the same starting model.
`auto` (the default) takes `adapter_off` when the model has an adapter to switch off and
switching it off leaves the first micro-batch's log-probs as they are, else `precomputed`.
A model path (`objective.reference: PATH`) is loaded, its log-probs precomputed, and freed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from peftune.errors import InputError
from peftune.recipe.schema import Recipe

log = logging.getLogger("peftune.train")

MODES = ("auto", "adapter_off", "precomputed")


@dataclass
class ReferenceLogps:
    """How a run gets log π_ref: `train` and `val` map a batch to its examples' values."""

    mode: str  # adapter_off | precomputed | the reference model's path
    train: Any
    val: Any
    seconds: float = 0.0  # spent precomputing


class AdapterOff:
    """log π_ref(y|x) from the policy with its adapter switched off."""

    def __init__(self, model: Any, *, chunked: bool):
        self.model, self.chunked = model, chunked

    def __call__(self, batch: dict) -> Any:
        import torch

        from peftune.train.loss import sequence_logps

        with torch.no_grad(), self.model.disable_adapter():
            return sequence_logps(self.model, batch, chunked=self.chunked)[0]


class Lookup:
    """log π_ref(y|x) read from a table of every example's value."""

    def __init__(self, table: np.ndarray):
        self.table = table

    def __call__(self, batch: dict) -> Any:
        import torch

        ids = batch["example_ids"].cpu().numpy()
        return torch.from_numpy(self.table[ids]).to(batch["labels"].device)


def build_reference(recipe: Recipe, *, model: Any, accelerator: Any,
                    batches: Sequence[dict], val_batches: Sequence[dict] | None,
                    sizes: tuple[int, int]) -> ReferenceLogps | None:
    """The run's reference, for an objective that uses one (else None). `model` is the
    unwrapped starting model; `batches` / `val_batches` cover every training / validation
    example once; `sizes` are the two sets' example counts."""
    import time

    objective = recipe.train.objective
    if not objective.uses_reference:
        return None
    chunked = recipe.train.chunked_loss
    mode = objective.reference
    if mode in ("auto", "adapter_off") and batches:
        switchable = callable(getattr(model, "disable_adapter", None))
        if mode == "adapter_off" and not switchable:
            raise InputError(f"train.objective.reference: adapter.method "
                             f"{recipe.adapter.method} has no adapter peft can switch off; "
                             "use reference: precomputed (or auto)")
        if mode == "adapter_off" or (switchable and _adapter_off_is_start(model, batches[0],
                                                                           chunked)):
            off = AdapterOff(model, chunked=chunked)
            return ReferenceLogps("adapter_off", off, off)
        log.info("the reference log-probs are precomputed: switching %s's adapter off does "
                 "not give the starting model", recipe.adapter.method)
    began = time.perf_counter()
    if mode in MODES:
        tables = [precompute(model, part, size, accelerator=accelerator, chunked=chunked)
                  for part, size in zip((batches, val_batches or []), sizes, strict=True)]
        name = "precomputed"
    else:
        reference = load_reference_model(recipe, accelerator.device)
        tables = [precompute(reference, part, size, accelerator=accelerator, chunked=chunked)
                  for part, size in zip((batches, val_batches or []), sizes, strict=True)]
        del reference
        name = mode
    return ReferenceLogps(name, Lookup(tables[0]), Lookup(tables[1]),
                          seconds=time.perf_counter() - began)


def _adapter_off_is_start(model: Any, batch: dict, chunked: bool) -> bool:
    """Whether the model with its adapter off scores `batch` as the model does."""
    import torch

    from peftune.train.loss import sequence_logps

    batch = {k: (v.to(model.device) if hasattr(v, "to") else v) for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            on = sequence_logps(model, batch, chunked=chunked)[0]
            with model.disable_adapter():
                off = sequence_logps(model, batch, chunked=chunked)[0]
    finally:
        model.train(was_training)
    return bool(torch.allclose(on, off, rtol=1e-5, atol=1e-4))


def precompute(model: Any, batches: Sequence[dict], size: int, *, accelerator: Any,
               chunked: bool) -> np.ndarray:
    """Every example's log π(y|x) under `model` (float32, indexed by example), without
    gradients or dropout. With several processes each takes every N-th batch and the table
    is summed over them."""
    import torch

    from peftune.train.loss import sequence_logps

    table = np.zeros(size, dtype=np.float32)
    world, rank = accelerator.num_processes, accelerator.process_index
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), accelerator.autocast():
            for index in range(rank, len(batches), world):
                batch = {k: (v.to(accelerator.device) if hasattr(v, "to") else v)
                         for k, v in batches[index].items()}
                logps = sequence_logps(model, batch, chunked=chunked)[0]
                table[batch["example_ids"].cpu().numpy()] = logps.float().cpu().numpy()
    finally:
        model.train(was_training)
    if world > 1:
        summed = accelerator.reduce(torch.from_numpy(table).to(accelerator.device), "sum")
        table = summed.cpu().numpy()
    return table


def load_reference_model(recipe: Recipe, device: Any) -> Any:
    """The model `train.objective.reference` names, with the run's tokenizer checked against
    its own; one line when it is not a model."""
    from peftune.models import load_model, load_tokenizer, resolve_model_path
    from peftune.recipe.schema import ModelSection, QuantSection

    path = recipe.train.objective.reference
    key = "train.objective.reference"
    try:
        resolved = resolve_model_path(path)
        section = ModelSection(path=path, dtype=recipe.model.dtype,
                               trust_remote_code=recipe.model.trust_remote_code,
                               allow_pickle=recipe.model.allow_pickle)
        theirs = load_tokenizer(resolved, trust_remote_code=section.trust_remote_code)
        ours = load_tokenizer(resolve_model_path(recipe.model.path),
                              trust_remote_code=recipe.model.trust_remote_code)
        if theirs.get_vocab() != ours.get_vocab():
            raise InputError(f"{key}: {path} has another vocabulary than model.path "
                             f"{recipe.model.path}; the reference must share the policy's "
                             "tokenizer")
        return load_model(section, QuantSection(), device=device)
    except InputError as err:
        line = str(err).replace("model.path: ", "")
        raise InputError(line if line.startswith(key) else f"{key}: {line}; use auto, "
                         "adapter_off, precomputed or the directory of a model") from None
