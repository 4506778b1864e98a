"""Perplexity: the mean negative log-likelihood of the target tokens (all tokens of text
data; the responses of instruction data; the assistant turns of chat data), its
exponential, bits per byte and the token count.

Texts longer than `window` tokens are scored with a strided sliding window (the scheme of
transformers' perplexity guide): windows start every `stride` tokens, and each scores only
the tokens the previous window did not, with the rest of the window as context, so every
target token is scored exactly once with at least `window - stride` tokens before it.

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes that the target tokens
decode to, which compares models with different tokenizers; special tokens (EOS) add loss
but no bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from peftune.data.formats import IGNORE_INDEX, check_format_setup
from peftune.data.sources import resolve_source
from peftune.data.tokenized import tokenize_source
from peftune.errors import InputError
from peftune.evaluate.common import pad_right, plan_batches, target_nll, target_runs
from peftune.recipe.schema import DataSection

DEFAULT_WINDOW = 1024
# The data keys a perplexity task shares with the data section (same names and defaults).
DATA_KEYS = ("format", "text_field", "prompt_field", "input_field", "response_field",
             "messages_field", "roles", "prompt_template", "add_eos", "on_bad_row")


@dataclass(frozen=True)
class Window:
    example: int
    begin: int
    end: int
    score_from: int  # labels before this position were scored by the previous window


@dataclass
class Prepared:
    data: Any  # TokenizedSet
    windows: list[Window]
    batches: list[list[int]]
    target_bytes: np.ndarray
    window: int
    stride: int
    skipped: int  # examples without a target token

    @property
    def examples(self) -> int:
        return len(self.data)


def data_section(task: Any) -> DataSection:
    """The task's data keys as a data section, with no truncation (windows handle length)."""
    return DataSection(train=task.data, max_length=2**62, packing=False,
                       **{key: getattr(task, key) for key in DATA_KEYS})


def sliding_windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, score_from) of each window over a text of `length` tokens."""
    if length <= window:
        return [(0, length, 0)]
    out, scored = [], 0
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        out.append((begin, end, scored))
        scored = end
        if end == length:
            break
    return out


class PerplexityTask:
    name = "perplexity"

    def prepare(self, task: Any, tokenizer: Any, *, key: str, context: int) -> Prepared:
        section = data_section(task)
        check_format_setup(section, tokenizer)
        source = resolve_source(task.data, key=key)
        try:
            data, meta = tokenize_source(section, tokenizer, source=source, key=key,
                                         display=task.data, limit=task.max_examples)
        except InputError as err:  # bad rows: `file:line: problem`, under the task's key
            raise InputError(*[line if line.startswith(key) else f"{key}: {line}"
                               for line in err.lines]) from None
        has_target = data.target_counts() > 0
        keep = np.flatnonzero(has_target)
        if len(keep) == 0:
            raise InputError(f"{key}: {task.data} has no usable examples ({meta['rows_read']} "
                             f"rows read, {meta['rows_skipped']} skipped as bad, none with a "
                             "target token)")
        data = data.select(keep)
        window = task.window or min(context, DEFAULT_WINDOW)
        stride = task.stride or max(1, window // 2)
        if stride >= window:
            raise InputError(f"{key}: stride {stride} must be less than window {window}")
        windows = [Window(i, *span) for i in range(len(data))
                   for span in sliding_windows(int(data.lengths[i]), window, stride)]
        lengths = [w.end - w.begin for w in windows]
        target_bytes = np.array([_target_bytes(tokenizer, *data[i]) for i in range(len(data))],
                                dtype=np.int64)
        return Prepared(data=data, windows=windows, target_bytes=target_bytes, window=window,
                        stride=stride, batches=plan_batches(lengths, task.batch_size),
                        skipped=int(len(has_target) - len(keep)))

    def run_batch(self, prepared: Prepared, loaded: Any, batch: list[int]) -> list[tuple]:
        rows = []
        for index in batch:
            w = prepared.windows[index]
            ids, labels = prepared.data[w.example]
            labels = labels[w.begin:w.end].astype(np.int64)
            labels[:w.score_from - w.begin] = IGNORE_INDEX
            rows.append((ids[w.begin:w.end], labels))
        tensors = pad_right(rows, loaded.tokenizer.pad_token_id)
        nll = target_nll(loaded.model, tensors, extra=loaded.extra(len(rows)))
        # a window's label 0 has no position before it to be predicted from
        counts = [int(np.count_nonzero(lab[1:] != IGNORE_INDEX)) for _, lab in rows]
        return [(index, {"nll": loss, "tokens": n})
                for index, loss, n in zip(batch, nll, counts, strict=True)]

    def summarise(self, prepared: Prepared, records: dict[int, dict]) -> tuple[dict, list]:
        per_example = np.zeros(prepared.examples)
        tokens = np.zeros(prepared.examples, dtype=np.int64)
        for index, window in enumerate(prepared.windows):  # window order: a fixed sum order
            per_example[window.example] += records[index]["nll"]
            tokens[window.example] += records[index]["tokens"]
        total, count = float(per_example.sum()), int(tokens.sum())
        loss = total / max(count, 1)
        n = prepared.examples
        metrics = {
            "loss": {"value": loss, "n": n},
            "perplexity": {"value": math.exp(loss) if loss < 700 else math.inf, "n": n},
            "bits_per_byte": {"value": total / math.log(2) / max(int(prepared.target_bytes.sum()), 1),
                              "n": n},
            "tokens": {"value": count, "n": n},
        }
        predictions = [{"index": i, "loss": float(per_example[i] / max(tokens[i], 1)),
                        "tokens": int(tokens[i]), "bytes": int(prepared.target_bytes[i])}
                       for i in range(n)]
        return metrics, predictions


def _target_bytes(tokenizer: Any, ids: np.ndarray, labels: np.ndarray) -> int:
    return sum(len(tokenizer.decode(run.tolist(), skip_special_tokens=True).encode("utf-8"))
               for run in target_runs(ids, labels))


TASK = PerplexityTask()
