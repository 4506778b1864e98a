"""Generation: prompt -> reference pairs, answered by the model and scored by
`exact_match` (after the `normalize` steps), `contains` (the normalised reference occurs in
the normalised prediction) and `regex_match` (the last match of `answer_regex`, e.g. the
final number of a GSM8K-style answer, is the same in both).

Instruction rows are prompted exactly as training formats them (BOS + the prompt template);
chat rows are rendered by the tokenizer's chat template up to the last assistant turn,
which is the reference, with the generation prompt added; the template's end-of-turn token
stops generation. Prompts are batched with left padding. Greedy when `temperature` is 0,
else sampled with `temperature` and `top_p`, seeded per batch (the same on any number of
processes). Generation stops at EOS, at `max_new_tokens`, or at a `stop` string (cut off).
"""

from __future__ import annotations

import re
import string
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from peftune.data.formats import (
    RowError,
    chat_messages,
    check_format_setup,
    leading_special_ids,
    string_field,
)
from peftune.evaluate.common import Located, model_device, plan_batches, read_examples
from peftune.evaluate.perplexity import data_section

_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass(frozen=True)
class Pair:
    prompt: str
    reference: str | None  # None: a prompt to answer, with nothing to score against


@dataclass
class Prepared:
    task: Any
    examples_: list[Located]
    prompts: list[list[int]]
    batches: list[list[int]]
    stop_ids: list[int]
    context: int

    @property
    def examples(self) -> int:
        return len(self.examples_)


class GenerateTask:
    name = "generate"

    def prepare(self, task: Any, tokenizer: Any, *, key: str, context: int) -> Prepared:
        check_format_setup(data_section(task), tokenizer)

        def parse(row: dict) -> Pair:
            return _pair(row, task, tokenizer)

        examples = read_examples(task, key=key, parse=parse)
        bos = leading_special_ids(tokenizer) if task.format == "instruction" else []
        keep = max(1, context - task.max_new_tokens)  # the end of a long prompt
        prompts = [(bos + tokenizer(e.item.prompt, add_special_tokens=False)["input_ids"])[-keep:]
                   for e in examples]
        stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if task.format == "chat":
            stop_ids += end_of_turn_ids(tokenizer)
        return Prepared(task=task, examples_=examples, prompts=prompts, context=context,
                        batches=plan_batches([len(p) for p in prompts], task.batch_size),
                        stop_ids=sorted(set(stop_ids)))

    def run_batch(self, prepared: Prepared, loaded: Any, batch: list[int]) -> list[tuple]:
        import torch

        task, tokenizer = prepared.task, loaded.tokenizer
        prompts = [prepared.prompts[i] for i in batch]
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for j, prompt in enumerate(prompts):  # left padding: every prompt ends at the same column
            ids[j, width - len(prompt):] = prompt
            mask[j, width - len(prompt):] = 1
        device = model_device(loaded.model)
        sampled = task.temperature > 0
        options: dict[str, Any] = dict(max_new_tokens=task.max_new_tokens, do_sample=sampled,
                                       pad_token_id=tokenizer.pad_token_id, use_cache=True)
        if sampled:
            options.update(temperature=task.temperature, top_p=task.top_p, top_k=0)
            torch.manual_seed(task.seed + min(batch))  # the batch's own seed, whatever the rank
        else:
            options.update(temperature=None, top_p=None, top_k=None)
        if prepared.stop_ids:
            options["eos_token_id"] = prepared.stop_ids
        if task.stop:
            options.update(stop_strings=list(task.stop), tokenizer=tokenizer)
        with torch.inference_mode(), warnings.catch_warnings():
            # peft's prompt-learning generate drops position ids, as it should: not news
            warnings.filterwarnings("ignore", message="Position ids are not supported")
            out = loaded.model.generate(input_ids=torch.from_numpy(ids).to(device),
                                        attention_mask=torch.from_numpy(mask).to(device),
                                        **options, **loaded.extra(len(prompts)))
        texts = [_cut_at_stop(text, task.stop) for text in
                 tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        return [(index, {"prediction": text, "answer_tokens": length})
                for index, text, length in zip(batch, texts, lengths, strict=True)]

    def summarise(self, prepared: Prepared, records: dict[int, dict]) -> tuple[dict, list]:
        task = prepared.task
        totals = dict.fromkeys(task.metrics, 0)
        predictions = []
        n = 0  # rows with a reference: the others are answered, not scored
        lengths = []  # tokens of each answer (as cut at a stop string)
        for located in prepared.examples_:
            prediction = records[located.index]["prediction"]
            reference = located.item.reference
            scores = score(prediction, reference, task) if reference is not None else {}
            n += reference is not None
            for name in scores:
                totals[name] += scores[name]
            tokens = records[located.index]["answer_tokens"]
            lengths.append(tokens)
            predictions.append({"index": located.index, "location": located.location,
                                "prompt": located.item.prompt, "reference": reference,
                                "prediction": prediction, "answer_tokens": tokens, **scores})
        length = {"answer_tokens": {"value": sum(lengths) / max(len(lengths), 1),
                                    "n": len(lengths)}}
        if n == 0:  # prompts only: the predictions are the result
            return {"answered": {"value": prepared.examples, "n": prepared.examples},
                    **length}, predictions
        return {**{name: {"value": total / n, "n": n} for name, total in totals.items()},
                **length}, predictions


def normalize(text: str, steps: list[str]) -> str:
    """Apply the `normalize` steps in a fixed order: lower, punctuation, articles,
    whitespace (collapse runs), strip."""
    if "lower" in steps:
        text = text.lower()
    if "punctuation" in steps:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if "articles" in steps:
        text = _ARTICLES.sub(" ", text)
    if "whitespace" in steps:
        text = " ".join(text.split())
    if "strip" in steps:
        text = text.strip()
    return text


def extract_answer(text: str, pattern: str) -> str | None:
    """The last match of `pattern` (its first group when it has one), commas dropped."""
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    last = matches[-1]
    found = last.group(1) if last.re.groups else last.group(0)
    return None if found is None else found.replace(",", "").strip()


def score(prediction: str, reference: str, task: Any) -> dict[str, bool]:
    pred, ref = normalize(prediction, task.normalize), normalize(reference, task.normalize)
    out = {}
    if "exact_match" in task.metrics:
        out["exact_match"] = pred == ref
    if "contains" in task.metrics:
        out["contains"] = bool(ref) and ref in pred
    if "regex_match" in task.metrics:
        answer = extract_answer(reference, task.answer_regex)
        out["regex_match"] = answer is not None and answer == extract_answer(prediction,
                                                                             task.answer_regex)
    return out


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


def _pair(row: dict, task: Any, tokenizer: Any) -> Pair:
    if task.format == "chat":
        messages = chat_messages(row, task.messages_field, need_assistant=False,
                                 roles=task.roles)
        answered = messages[-1]["role"] == "assistant"
        if answered and len(messages) < 2:
            raise RowError("the only message is the assistant's: there is no prompt to answer",
                           task.messages_field)
        try:
            prompt = tokenizer.apply_chat_template(messages[:-1] if answered else messages,
                                                   tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja's raise_exception and template bugs alike
            raise RowError(f"the chat template failed: {exc}", task.messages_field) from None
        return Pair(prompt=prompt, reference=messages[-1]["content"] if answered else None)
    values = {"prompt": string_field(row, task.prompt_field)}
    if task.input_field:
        value = row.get(task.input_field)
        if value is not None and not isinstance(value, str):
            raise RowError("expected a string", task.input_field)
        values["input"] = value or ""
    reference = (string_field(row, task.response_field, allow_empty=True)
                 if row.get(task.response_field) is not None else None)
    return Pair(prompt=task.prompt_template.format(**values), reference=reference)


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The token that the chat template writes right after an assistant message (ChatML's
    <|im_end|>), when it is a single token: generation stops there."""
    probe = "PEFTUNE_PROBE"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that refuses the probe: no extra stop token
        return []
    after = text[text.index(probe) + len(probe):].strip() if probe in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return ids[:1] if ids and tokenizer.convert_ids_to_tokens(ids[0]) in tokenizer.all_special_tokens else []


TASK = GenerateTask()
