"""Multiple choice by log-likelihood: each option is scored as the continuation of the
question (`prompt_template` filled with the row's `prompt_field`), and the most likely
option is the model's answer. Two accuracies, as lm-evaluation-harness reports them:
`accuracy` picks the option with the highest summed log-probability, `accuracy_norm` the
highest log-probability per UTF-8 byte of the option (which does not favour short options).

Rows: {"prompt": "2 + 2 =", "choices": [" 3", " 4"], "answer": 1}; `answer` is the index of
the right option, or its text. With `format: chat` (an instruct model) the question is the
user's turn rendered by the chat template, and each option is the assistant's whole answer:
its text and the template's end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from peftune.data.formats import (
    IGNORE_INDEX,
    RowError,
    check_format_setup,
    leading_special_ids,
    string_field,
)
from peftune.data.sources import json_type
from peftune.evaluate.common import Located, pad_right, plan_batches, read_examples, target_nll
from peftune.evaluate.generate import end_of_turn_ids
from peftune.evaluate.perplexity import data_section


@dataclass(frozen=True)
class Question:
    context: str
    choices: list[str]
    answer: int


@dataclass
class Prepared:
    examples_: list[Located]
    units: list[tuple[int, int]]  # (example, option)
    rows: list[tuple[np.ndarray, np.ndarray]]
    batches: list[list[int]]

    @property
    def examples(self) -> int:
        return len(self.examples_)


class ChoiceTask:
    name = "choice"

    def prepare(self, task: Any, tokenizer: Any, *, key: str, context: int) -> Prepared:
        def parse(row: dict) -> Question:
            return _question(row, task)

        examples = read_examples(task, key=key, parse=parse)
        chat = task.format == "chat"
        if chat:
            check_format_setup(data_section(task), tokenizer)  # a chat template is needed
        bos = [] if chat else leading_special_ids(tokenizer)  # a template writes its own
        end = end_of_turn_ids(tokenizer) if chat else []  # an option is the whole answer
        units, rows = [], []
        for located in examples:
            question = located.item
            context = _chat_prompt(tokenizer, question.context.strip()) if chat else question.context
            context_ids = bos + tokenizer(context, add_special_tokens=False)["input_ids"]
            for option, text in enumerate(question.choices):
                option_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + end
                ids = np.asarray(context_ids + option_ids, dtype=np.int64)
                labels = ids.copy()
                labels[:len(context_ids)] = IGNORE_INDEX
                units.append((located.index, option))
                rows.append((ids, labels))
        return Prepared(examples_=examples, units=units, rows=rows,
                        batches=plan_batches([len(ids) for ids, _ in rows], task.batch_size))

    def run_batch(self, prepared: Prepared, loaded: Any, batch: list[int]) -> list[tuple]:
        rows = [prepared.rows[i] for i in batch]
        nll = target_nll(loaded.model, pad_right(rows, loaded.tokenizer.pad_token_id),
                         extra=loaded.extra(len(rows)))
        return [(index, {"logprob": -loss}) for index, loss in zip(batch, nll, strict=True)]

    def summarise(self, prepared: Prepared, records: dict[int, dict]) -> tuple[dict, list]:
        scores: list[list[float]] = [[] for _ in prepared.examples_]
        for index, (example, _) in enumerate(prepared.units):
            scores[example].append(records[index]["logprob"])
        predictions, correct, correct_norm = [], 0, 0
        for located, logprobs in zip(prepared.examples_, scores, strict=True):
            question = located.item
            per_byte = [lp / max(len(text.encode("utf-8")), 1)
                        for lp, text in zip(logprobs, question.choices, strict=True)]
            pred, pred_norm = int(np.argmax(logprobs)), int(np.argmax(per_byte))
            correct += pred == question.answer
            correct_norm += pred_norm == question.answer
            predictions.append({"index": located.index, "location": located.location,
                                "answer": question.answer, "prediction": pred,
                                "prediction_norm": pred_norm, "logprobs": logprobs,
                                "correct": pred == question.answer})
        n = prepared.examples
        return {"accuracy": {"value": correct / n, "n": n},
                "accuracy_norm": {"value": correct_norm / n, "n": n}}, predictions


def _chat_prompt(tokenizer: Any, question: str) -> str:
    """The question as the user's turn, rendered by the chat template up to the assistant's."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)


def _question(row: dict, task: Any) -> Question:
    prompt = string_field(row, task.prompt_field)
    if task.answer_field not in row:
        raise RowError(f"missing field; the row has: {', '.join(sorted(map(str, row)))}",
                       task.answer_field)
    choices = row.get(task.choices_field)
    if choices is None:
        raise RowError(f"missing field; the row has: {', '.join(sorted(map(str, row)))}",
                       task.choices_field)
    if not isinstance(choices, list) or len(choices) < 2:
        raise RowError(f"expected a list of at least 2 options, got {json_type(choices)}"
                       if not isinstance(choices, list) else
                       f"expected at least 2 options, got {len(choices)}", task.choices_field)
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise RowError(f"option {i}: expected a non-empty string, got {json_type(choice)}",
                           task.choices_field)
    answer = row[task.answer_field]
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    elif isinstance(answer, str) and answer.strip().isdigit():  # CSV cells are text
        answer = int(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise RowError(f"expected the index of the right option (0..{len(choices) - 1}) or its "
                       f"text, got {answer!r}", task.answer_field)
    return Question(context=task.prompt_template.format(prompt=prompt), choices=list(choices),
                    answer=answer)


TASK = ChoiceTask()
