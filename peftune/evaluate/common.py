"""What every eval task shares: reading rows with their locations, padded batches, the
summed log-likelihood of target tokens. The ranks of a multi-process evaluation are
`peftune.dist.Ranks`.

Work is planned in batches that do not depend on the number of processes (examples sorted
by length, then cut into `batch_size` pieces); rank r runs batches r, r + W, ... and the
per-example records are gathered and put back in example order, so W processes compute
exactly what one process computes, batch by batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from peftune.data.formats import IGNORE_INDEX, RowError
from peftune.data.sources import iter_rows, resolve_source
from peftune.data.tokenized import MAX_REPORTED_BAD_ROWS
from peftune.errors import InputError


@dataclass(frozen=True)
class Located:
    """One usable example: its index among the usable ones, where it came from, and what
    the task's parser made of the row."""

    index: int
    location: str
    item: Any


def read_examples(task: Any, *, key: str, parse: Callable[[dict], Any]) -> list[Located]:
    """The rows of `task.data`, parsed by `parse(row)` (which raises RowError for a row it
    cannot use). Bad rows stop the evaluation with one line each (`file:line: problem (field
    'x')`), or are left out with `on_bad_row: skip`; an empty result is an error."""
    source = resolve_source(task.data, key=key)
    good: list[Located] = []
    bad: list[str] = []
    for row in iter_rows(source, key=key, display=task.data, limit=task.max_examples):
        try:
            if row.row is None:
                raise RowError(row.problem or "unreadable row")
            item = parse(row.row)
        except RowError as err:
            if err.fatal:
                raise InputError(f"{key}: {row.location}: {err.message}") from None
            bad.append(f"{key}: {row.location}: {err.message}")
            continue
        good.append(Located(len(good), row.location, item))
    if bad and task.on_bad_row == "error":
        lines = bad[:MAX_REPORTED_BAD_ROWS]
        if len(bad) > MAX_REPORTED_BAD_ROWS:
            lines.append(f"... and {len(bad) - MAX_REPORTED_BAD_ROWS} more bad rows "
                         "(on_bad_row: skip leaves bad rows out)")
        raise InputError(*lines)
    if not good:
        raise InputError(f"{key}: {task.data} has no usable examples"
                         + (f" ({len(bad)} bad rows skipped)" if bad else ""))
    return good


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, ties in index order),
    so little of each batch is padding; the plan depends only on the lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_right(rows: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict[str, Any]:
    """input_ids, attention_mask and labels (IGNORE_INDEX on padding) as long tensors."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for j, (ids, lab) in enumerate(rows):
        input_ids[j, :len(ids)] = ids
        labels[j, :len(ids)] = lab
        mask[j, :len(ids)] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels)}


def target_nll(model: Any, batch: dict[str, Any], *, extra: dict | None = None) -> list[float]:
    """Summed next-token negative log-likelihood of each row's target tokens (labels !=
    -100; label t is predicted from position t - 1), computed in float32.

    Methods that prepend virtual tokens (prompt tuning) return longer logits: only the
    rows' own positions are scored."""
    import torch

    from peftune.train.loss import target_nll_per_row

    device = model_device(model)
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        # the training loss's computation: the head in chunks over target positions only
        per_row = target_nll_per_row(model, {**inputs, **(extra or {})}, batch["labels"].to(device))
        return [float(x) for x in per_row.cpu()]


def model_device(model: Any) -> Any:
    return next(model.parameters()).device


def target_runs(ids: np.ndarray, labels: np.ndarray) -> Iterator[np.ndarray]:
    """The contiguous runs of target tokens (for counting the bytes they decode to)."""
    is_target = labels != IGNORE_INDEX
    start = None
    for i, flag in enumerate(is_target):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            yield ids[start:i]
            start = None
    if start is not None:
        yield ids[start:]
