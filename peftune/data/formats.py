"""Data formats: how one row becomes text segments, each a training target or not.

A format is one function registered under the name a recipe uses (`data.format`). It reads
a row and returns `Segments`: the row's text cut into pieces, each marked target or not, plus
whether the tokenizer's own leading special tokens (BOS) and an EOS go around it. Formats
never tokenize: `SegmentEncoder` tokenizes the segments of many rows in one batched call
(fast tokenizers are ~50x faster on a list than row by row) and builds the label masks.
Tokenizing each segment on its own makes the target boundary exact, and matches inference,
where the prompt is tokenized alone and the answer is generated after it.

A row that cannot be used raises `RowError`; the caller adds the row's location and decides
whether to stop or skip (`data.on_bad_row`).
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peftune.data.sources import json_type
from peftune.errors import InputError
from peftune.recipe.schema import DataSection

IGNORE_INDEX = -100  # the label that torch's cross-entropy skips
CHAT_ROLES = ("system", "user", "assistant", "tool")
# ShareGPT-style messages ({"from": "human", "value": "..."}): their speakers as roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "model": "assistant", "chatgpt": "assistant",
                  "tool": "tool", "function_response": "tool", "observation": "tool"}


class RowError(Exception):
    """A problem with one row: `problem`, and the recipe field it concerns when there is one."""

    def __init__(self, problem: str, field_name: str | None = None, *, fatal: bool = False):
        self.problem = problem
        self.field_name = field_name
        self.fatal = fatal  # the same problem would hit every row: stop even with on_bad_row: skip
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.problem} (field '{self.field_name}')" if self.field_name else self.problem


# What an example is to the objective (stored per example with the tokens): a plain example,
# one side of a preference pair (the chosen one first, the rejected one right after it), or
# an unpaired KTO completion that is desirable or not.
ROLE_PLAIN, ROLE_CHOSEN, ROLE_REJECTED, ROLE_DESIRABLE, ROLE_UNDESIRABLE = 0, 1, 2, 3, 4


@dataclass
class Segments:
    """A row's text in order: (text, is_target) pieces; `bos`: prepend the tokenizer's own
    leading special tokens; `eos`: append EOS as a target; `role`: one of the ROLE_ values."""

    parts: list[tuple[str, bool]] = field(default_factory=list)
    bos: bool = False
    eos: bool = False
    role: int = ROLE_PLAIN


# A format turns a row into one example, or into several that stay together (a pair).
FormatFn = Callable[[dict[str, Any], DataSection, Any], "Segments | list[Segments]"]
FORMATS: dict[str, FormatFn] = {}


def register_format(name: str) -> Callable[[FormatFn], FormatFn]:
    """Register `fn(row, cfg, tokenizer) -> Segments` under the name a recipe uses."""

    def decorate(fn: FormatFn) -> FormatFn:
        FORMATS[name] = fn
        return fn

    return decorate


def get_format(name: str) -> FormatFn:
    if name not in FORMATS:
        raise InputError(f"data.format: unknown format {name!r}; use one of {', '.join(FORMATS)}")
    return FORMATS[name]


def check_format_setup(cfg: DataSection, tokenizer: Any) -> None:
    """Problems that would make every row fail, reported once before any row is read."""
    get_format(cfg.format)
    if cfg.format in ("text", "instruction") and cfg.add_eos and tokenizer.eos_token_id is None:
        raise InputError("data.add_eos: the tokenizer has no EOS token; set data.add_eos: false "
                         "or use a tokenizer with an eos_token")
    if cfg.format in ("preference", "kto") and cfg.add_eos and tokenizer.eos_token_id is None:
        raise InputError(f"data.add_eos: the tokenizer has no EOS token, which ends plain-text "
                         f"responses of data.format: {cfg.format}; set data.add_eos: false")
    if cfg.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise InputError("data.format: chat needs a tokenizer with a chat template, and this one "
                         "has none; use a chat model's tokenizer, or data.format: instruction "
                         "(prompt/response fields) or text")
    if cfg.format == "instruction":
        problem = prompt_template_problem(cfg.prompt_template, cfg.input_field)
        if problem:
            raise InputError(f"data.prompt_template: {problem}")


def prompt_template_problem(template: str, input_field: str | None) -> str | None:
    """What is wrong with an instruction prompt template, or None."""
    allowed = {"prompt", "input"} if input_field else {"prompt"}
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template)
                 if name is not None}
    except ValueError as exc:
        return f"{exc}; write a literal brace as {{{{ or }}}}"
    unknown = sorted(names - allowed)
    if unknown:
        hint = "" if input_field else " (and {input} with input_field set)"
        return (f"unknown placeholder {{{unknown[0]}}}; use {{prompt}}{hint}; write a literal "
                "brace as {{ or }}")
    return None


def require_field(row: dict[str, Any], name: str) -> Any:
    """`row[name]`, or a RowError that lists the fields the row does have."""
    if name not in row:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise RowError(f"missing field; the row has: {keys}", name)
    return row[name]


def string_field(row: dict[str, Any], name: str, *, allow_empty: bool = False) -> str:
    """`row[name]` as a non-empty string, or a RowError naming the field."""
    value = require_field(row, name)
    if not isinstance(value, str):
        raise RowError(f"expected a string, got {json_type(value)}", name)
    if not allow_empty and not value.strip():
        raise RowError("empty text", name)
    return value


@register_format("text")
def text_format(row: dict[str, Any], cfg: DataSection, tokenizer: Any) -> Segments:
    """Plain language modelling: every token of `row[text_field]` is a target."""
    return Segments([(string_field(row, cfg.text_field), True)], bos=True, eos=cfg.add_eos)


@register_format("instruction")
def instruction_format(row: dict[str, Any], cfg: DataSection, tokenizer: Any) -> Segments:
    """Supervised fine-tuning on (prompt, response): the prompt template is context only,
    the response (and EOS, so the model learns to stop) is the target."""
    values = {"prompt": string_field(row, cfg.prompt_field)}
    if cfg.input_field:
        value = row.get(cfg.input_field)
        if value is not None and not isinstance(value, str):
            raise RowError(f"expected a string, got {json_type(value)}", cfg.input_field)
        values["input"] = value or ""
    response = string_field(row, cfg.response_field)
    return Segments([(cfg.prompt_template.format(**values), False), (response, True)],
                    bos=True, eos=cfg.add_eos)


@register_format("chat")
def chat_format(row: dict[str, Any], cfg: DataSection, tokenizer: Any) -> Segments:
    """Conversations rendered by the tokenizer's chat template; only assistant turns are
    targets. A turn's span is found by rendering prefixes: messages[:i] with the generation
    prompt must be a prefix of messages[:i+1], which must be a prefix of the whole chat.
    The template's own end markers close each turn (and are targets), so data.add_eos and
    BOS do not apply: a template that wants BOS writes it into the text."""
    messages = chat_messages(row, cfg.messages_field, roles=cfg.roles)

    def render(upto: int, generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages[:upto], tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja's raise_exception and template bugs alike
            raise RowError(f"the chat template failed: {exc}", cfg.messages_field) from None

    full = render(len(messages), False)
    parts: list[tuple[str, bool]] = []
    done = 0  # characters of `full` already in parts
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            # An opening assistant message (a greeting) has no prompt to render before it:
            # templates refuse an empty conversation. It stays context, not a target.
            continue
        before, through = render(i, True), render(i + 1, False)
        if not (through.startswith(before) and full.startswith(through)):
            raise RowError(
                "data.format: chat: the tokenizer's chat template is not prefix-consistent "
                f"(rendering the first {i} messages is not a prefix of rendering more), so "
                "assistant turns cannot be located; use a template that renders earlier turns "
                "the same whatever follows, or data.format: instruction", fatal=True)
        parts += [(full[done:len(before)], False), (full[len(before):len(through)], True)]
        done = len(through)
    if not any(target for _, target in parts):
        raise RowError("the only assistant message opens the conversation (no user turn before "
                       "it to answer), so nothing to train on", cfg.messages_field)
    parts.append((full[done:], False))
    return Segments([part for part in parts if part[0]], bos=False, eos=False)


def chat_messages(row: dict[str, Any], name: str, *, need_assistant: bool = True,
                  roles: dict[str, str] | None = None) -> list[dict[str, Any]]:
    messages = require_field(row, name)
    if isinstance(messages, str):  # CSV cells hold the conversation as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise RowError("expected a list of messages, got a string that is not JSON",
                           name) from None
    if not isinstance(messages, list):
        raise RowError(f"expected a list of messages, got {json_type(messages)}", name)
    if not messages:
        raise RowError("empty list of messages", name)
    messages = [_from_sharegpt(m, roles or {}) if isinstance(m, dict) and "from" in m
                and "role" not in m else m for m in messages]
    if roles:  # data.roles renames roles written as role/content too
        messages = [{**m, "role": roles.get(m.get("role"), m.get("role"))}
                    if isinstance(m, dict) and isinstance(m.get("role"), str) else m
                    for m in messages]
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowError(f"message {i}: expected an object with role and content, "
                           f"got {json_type(message)}", name)
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise RowError(f"message {i}: unknown role {role!r}; use {', '.join(CHAT_ROLES)} "
                           "(data.roles renames others)", name)
        if not isinstance(content, str):
            raise RowError(f"message {i}: content must be a string, got {json_type(content)}", name)
    if need_assistant and not any(message["role"] == "assistant" for message in messages):
        raise RowError("no assistant message, so nothing to train on", name)
    return messages


def _from_sharegpt(message: dict[str, Any], roles: dict[str, str]) -> dict[str, Any]:
    """{"from": "human", "value": "hi"} -> {"role": "user", "content": "hi"} (data.roles
    first, then the usual ShareGPT speakers); an unknown speaker is kept as the role, so the
    error names it."""
    speaker = message.get("from")
    role = speaker
    if isinstance(speaker, str):
        role = roles.get(speaker) or SHAREGPT_ROLES.get(speaker.lower(), speaker)
    return {"role": role, "content": message.get("value", message.get("content"))}


class SegmentEncoder:
    """Tokenizes the segments of many rows at once and builds (input_ids, labels).

    The first label of every example is IGNORE_INDEX whatever the format: its first token is
    never predicted, which is what keeps the loss of packed examples from crossing a boundary.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.bos_ids = leading_special_ids(tokenizer)
        self.eos_id = tokenizer.eos_token_id

    def encode(self, items: list[Segments]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat int32 input_ids and labels of all items, and each item's length (int64)."""
        texts = [text for item in items for text, _ in item.parts]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        ids: list[int] = []
        labels: list[int] = []
        lengths: list[int] = []
        pieces = iter(encoded)
        for item in items:
            start = len(ids)
            if item.bos:
                ids += self.bos_ids
                labels += [IGNORE_INDEX] * len(self.bos_ids)
            for _, is_target in item.parts:
                piece = next(pieces)
                ids += piece
                labels += piece if is_target else [IGNORE_INDEX] * len(piece)
            if item.eos:
                ids.append(self.eos_id)
                labels.append(self.eos_id)
            if len(ids) > start:
                labels[start] = IGNORE_INDEX
            lengths.append(len(ids) - start)
        return (np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32),
                np.asarray(lengths, dtype=np.int64))


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS for Llama, none for Qwen),
    found by encoding a probe with and without special tokens."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []
