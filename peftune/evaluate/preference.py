"""Preference pairs: how often, and by how much, a model prefers the chosen response of a
held-out pair to the rejected one. Rows are those of `data.format: preference` (a prompt, a
chosen and a rejected response: strings or chat messages).

For a prompt x and a response y, log π(y|x) is the summed log-probability of y's tokens and
|y| their number (`peftune.train.loss.sequence_logps`, as training scores them); y_w is the
chosen response and y_l the rejected one. Per model, means over pairs:
- `logp_accuracy`: the share of pairs with log π(y_w|x)/|y_w| > log π(y_l|x)/|y_l| (per-token
  means: reference-free, so meaningful for any model, the base included); `logp_margin`: the
  mean of that difference; `chosen_logp`, `rejected_logp`, `chosen_length`,
  `rejected_length`: the means of log π(y|x) and |y|;
- where the model has a reference, the base it was trained from (an adapter's base: the
  adapter switched off, as `train.objective.reference: adapter_off` does), the DPO implicit
  reward r(y) = β·(log π(y|x) - log π_ref(y|x)) (Rafailov et al. 2023, "Direct Preference
  Optimization", arXiv:2305.18290) and, as training logs them, `reward_accuracy` (the share of
  pairs with r(y_w) > r(y_l)), `reward_margin` (the mean of r(y_w) - r(y_l)),
  `chosen_reward`, `rejected_reward`. β is the task's `beta`: 0.1, or for a run trained with
  a preference objective that objective's β. A model without an adapter (the base of
  `--compare base`, a merged or fully fine-tuned model) has no reference here; its reward
  against itself would be 0 by definition, so its reward metrics are left out, not zeros.
  The reference of a model in memory at the end of training is exact where switching the
  adapter off gives the starting model (not PiSSA, LoRA-GA or LoftQ inits).

Rows are read and tokenized by the training data path with the task's data keys (the same
errors for bad rows), each example cut to `max_length` tokens (default: the model's context)
as `truncation` says; a pair is one row, chosen then rejected, as in a training batch.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from peftune.data.formats import ROLE_CHOSEN, check_format_setup
from peftune.data.packing import Row, micro_batches, pack_rows
from peftune.data.sources import resolve_source
from peftune.data.tokenized import tokenize_source, usable_rows
from peftune.errors import InputError
from peftune.evaluate.common import model_device, plan_batches
from peftune.evaluate.config import DEFAULT_BETA
from peftune.recipe.schema import EVAL_TASK_KEYS, DataSection

# The keys a preference task shares with the data section: same names and defaults (not
# max_length, whose default is the model's context).
DATA_KEYS = ("prompt_field", "chosen_field", "rejected_field", "roles", "prompt_template",
             "add_eos", "truncation", "on_bad_row")
SIDES = ("chosen", "rejected")


@dataclass
class Prepared:
    beta: float
    rows: list[Row]  # one pair each: the chosen example, then the rejected one
    source_rows: np.ndarray  # each pair's row in its file, counting from 0
    batches: list[list[int]]

    @property
    def examples(self) -> int:
        return len(self.rows)


class PreferenceTask:
    name = "preference"

    def prepare(self, task: Any, tokenizer: Any, *, key: str, context: int) -> Prepared:
        max_length = task.max_length or context
        left = task.truncation == "left"
        section = DataSection(train=task.data, format="preference", max_length=max_length,
                              **{name: getattr(task, name) for name in DATA_KEYS})
        try:
            check_format_setup(section, tokenizer)
            source = resolve_source(task.data, key=key)
            data, meta = tokenize_source(section, tokenizer, source=source, key=key,
                                         display=task.data, limit=task.max_examples)
            usable = data.target_counts(max_length, left=left) > 0
            if len(data):  # a prompt with no room for its response: the training path's line
                usable = usable_rows(section, data, usable, key=key, path=task.data, stats=meta)
        except InputError as err:
            raise InputError(*[_task_line(line, key) for line in err.lines]) from None
        keep = np.flatnonzero(usable)
        if not len(keep):
            raise InputError(f"{key}: {task.data} has no usable pairs ({meta['rows_read']} rows "
                             f"read, {meta['rows_skipped']} skipped as bad)")
        data = data.select(keep, max_length=max_length, left=left)
        rows = pack_rows(data, max_length=max_length, packing=False, seed=0)
        beta = DEFAULT_BETA if task.beta is None else task.beta  # run_eval called directly
        return Prepared(beta=beta, rows=rows, source_rows=data.source_rows[0::2],
                        batches=plan_batches([len(row) for row in rows], task.batch_size))

    def run_batch(self, prepared: Prepared, loaded: Any, batch: list[int]) -> list[tuple]:
        import torch

        from peftune.train.loss import sequence_logps
        from peftune.train.reference import AdapterOff

        model = loaded.model
        tensors = micro_batches([prepared.rows[i] for i in batch], batch_size=len(batch),
                                pad_id=loaded.tokenizer.pad_token_id, seed=0, epoch=0,
                                packing=True)[0]
        device = model_device(model)
        tensors = {name: value.to(device) for name, value in tensors.items()}
        reference = AdapterOff(model, chunked=True) if has_reference(model) else None
        with torch.inference_mode(), _task_ids(loaded):
            logps, lengths = sequence_logps(model, tensors)
            ref = reference(tensors) if reference is not None else None
        records: dict[int, dict] = {}
        # example k of the set is side k % 2 of pair (row) k // 2 (pack_rows, packing off)
        for j, (example, role) in enumerate(zip(tensors["example_ids"].tolist(),
                                                tensors["roles"].tolist(), strict=True)):
            side = SIDES[0] if role == ROLE_CHOSEN else SIDES[1]
            record = records.setdefault(example // 2, {})
            record[f"{side}_logp"] = float(logps[j])
            record[f"{side}_length"] = int(lengths[j])
            if ref is not None:
                record[f"{side}_ref"] = float(ref[j])
        return list(records.items())

    def summarise(self, prepared: Prepared, records: dict[int, dict]) -> tuple[dict, list]:
        n = prepared.examples

        def pairs(name: str) -> np.ndarray:  # (pairs, 2): chosen, rejected
            return np.array([[records[i][f"{side}_{name}"] for side in SIDES] for i in range(n)],
                            dtype=np.float64)

        logp, length = pairs("logp"), pairs("length")
        mean = logp / length
        gap = mean[:, 0] - mean[:, 1]
        values = {"logp_accuracy": np.mean(gap > 0), "logp_margin": gap.mean()}
        reward = prepared.beta * (logp - pairs("ref")) if "chosen_ref" in records[0] else None
        if reward is not None:
            margin = reward[:, 0] - reward[:, 1]
            values.update(reward_accuracy=np.mean(margin > 0), reward_margin=margin.mean(),
                          chosen_reward=reward[:, 0].mean(), rejected_reward=reward[:, 1].mean())
        values.update(chosen_logp=logp[:, 0].mean(), rejected_logp=logp[:, 1].mean(),
                      chosen_length=length[:, 0].mean(), rejected_length=length[:, 1].mean())
        metrics = {name: {"value": float(value), "n": n} for name, value in values.items()}
        predictions = []
        for i in range(n):
            line = {"index": i, "row": int(prepared.source_rows[i]) + 1,
                    "prefers_chosen": bool(gap[i] > 0)}
            for k, side in enumerate(SIDES):
                line[f"{side}_logp"] = float(logp[i, k])
                line[f"{side}_length"] = int(length[i, k])
                if reward is not None:
                    line[f"{side}_reward"] = float(reward[i, k])
            predictions.append(line)
        return metrics, predictions


def has_reference(model: Any) -> bool:
    """Whether the model is an adapter on a base that peft can switch it off from."""
    return callable(getattr(model, "disable_adapter", None))


@contextlib.contextmanager
def _task_ids(loaded: Any) -> Iterator[None]:
    """Poly and MHR adapters route by `task_ids`, which `sequence_logps` does not pass: each
    forward of the model gets them (all task 0), as `Loaded.extra` gives them."""
    if not loaded.needs_task_ids:
        yield
        return

    def add(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("task_ids") is None:
            kwargs["task_ids"] = loaded.extra(kwargs["input_ids"].shape[0])["task_ids"]
        return args, kwargs

    handle = loaded.model.register_forward_pre_hook(add, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


_DATA_KEY = re.compile(r"\bdata\.(\w+)")


def _task_line(line: str, key: str) -> str:
    """A line of the training data path, under the task's key, with the data keys it names
    (`data.max_length`) named where the task has them (`eval.tasks[0].max_length`)."""
    scope = key.rpartition(".")[0]

    def rename(match: re.Match) -> str:
        own = match.group(1) in EVAL_TASK_KEYS["preference"] or match.group(1) == "on_bad_row"
        return f"{scope}.{match.group(1)}" if own else match.group(0)

    line = _DATA_KEY.sub(rename, line)
    return line if line.startswith(key) else f"{key}: {line}"


TASK = PreferenceTask()
