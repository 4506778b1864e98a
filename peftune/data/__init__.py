"""The data layer: sources -> formats (label masks) -> tokenized sets (cached) -> rows
(packed or not) -> micro-batches.

    splits = build_datasets(recipe.data, tokenizer, seed=seed)
    rows = pack_rows(splits.train, max_length=recipe.data.max_length,
                     packing=recipe.data.packing, seed=seed)          # once per run
    for epoch in ...:
        for batch in micro_batches(rows, batch_size=..., pad_id=..., seed=seed, epoch=epoch,
                                   packing=recipe.data.packing):
            inputs = {k: v for k, v in batch.items() if k != "num_tokens"}
            loss = model(**inputs, use_cache=False).loss  # use_cache=False keeps packing exact

A data mix (`data.train` a list of sources with weights) draws each epoch's examples anew
(`TrainingMix` in mix.py: `splits` carries the sources), and packs that epoch's rows.

Importing this package imports numpy but not torch, transformers or datasets; those are
imported by the functions that need them.
"""

from __future__ import annotations

from peftune.data import preference as _preference  # noqa: F401  (registers its formats)
from peftune.data.cache import DATA_FORMAT_VERSION, default_cache_dir
from peftune.data.formats import FORMATS, IGNORE_INDEX, RowError, Segments, register_format
from peftune.data.mix import TrainingMix
from peftune.data.packing import (
    MicroBatches,
    Row,
    block_causal_mask,
    micro_batches,
    pack_rows,
    packing_efficiency,
    per_example_losses,
)
from peftune.data.tokenized import DataSplits, MixSource, TokenizedSet, build_datasets

__all__ = [
    "DATA_FORMAT_VERSION",
    "FORMATS",
    "IGNORE_INDEX",
    "MicroBatches",
    "MixSource",
    "DataSplits",
    "Row",
    "RowError",
    "Segments",
    "TokenizedSet",
    "TrainingMix",
    "block_causal_mask",
    "build_datasets",
    "default_cache_dir",
    "micro_batches",
    "pack_rows",
    "packing_efficiency",
    "per_example_losses",
    "register_format",
]
