"""Preference data: `data.format: preference` (a prompt with a chosen and a rejected
response) and `data.format: kto` (a prompt, one completion, a boolean label).

A preference row becomes two examples kept side by side: prompt + chosen (ROLE_CHOSEN), then
prompt + rejected (ROLE_REJECTED). Only the response tokens are targets, so an objective
scores log π(y|x) over the response alone; the prompt's tokens are the same in both. A KTO
row becomes one example, ROLE_DESIRABLE or ROLE_UNDESIRABLE by its label.

Each text is a string or chat messages:
- a string prompt goes through `data.prompt_template` and the BOS of the tokenizer, and a
  string response ends with EOS (`data.add_eos`), as in `data.format: instruction`;
- a messages prompt is rendered with the tokenizer's chat template and its generation
  prompt; the response (a string, or the assistant's messages) is what the template writes
  after it for the whole conversation, end-of-turn markers included (targets, like chat).
"""

from __future__ import annotations

from typing import Any

from peftune.data.formats import (
    ROLE_CHOSEN,
    ROLE_DESIRABLE,
    ROLE_REJECTED,
    ROLE_UNDESIRABLE,
    RowError,
    Segments,
    chat_messages,
    register_format,
    require_field,
    string_field,
)
from peftune.data.sources import json_type
from peftune.recipe.schema import DataSection

PAIRED_ROLES = (ROLE_CHOSEN, ROLE_REJECTED)


@register_format("preference")
def preference_format(row: dict[str, Any], cfg: DataSection, tokenizer: Any) -> list[Segments]:
    """Two examples: the prompt with the chosen response, then with the rejected one."""
    prompt = _prompt(row, cfg, tokenizer)
    chosen = _response(row, cfg.chosen_field, prompt, cfg, tokenizer)
    rejected = _response(row, cfg.rejected_field, prompt, cfg, tokenizer)
    if chosen == rejected:
        raise RowError(f"chosen and rejected are the same response, so the pair prefers "
                       f"nothing (fields '{cfg.chosen_field}', '{cfg.rejected_field}'); remove "
                       "the row, or set data.on_bad_row: skip to leave such rows out")
    return [_example(prompt, chosen, cfg, ROLE_CHOSEN), _example(prompt, rejected, cfg, ROLE_REJECTED)]


@register_format("kto")
def kto_format(row: dict[str, Any], cfg: DataSection, tokenizer: Any) -> Segments:
    """One example: the prompt with its completion, desirable when the label is true."""
    prompt = _prompt(row, cfg, tokenizer)
    completion = _response(row, cfg.completion_field, prompt, cfg, tokenizer)
    label = require_field(row, cfg.label_field)
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # CSV cells
        label = label.strip().lower() == "true"
    if not isinstance(label, bool):
        raise RowError(f"expected true or false (is the completion desirable?), got "
                       f"{json_type(label)}", cfg.label_field)
    return _example(prompt, completion, cfg, ROLE_DESIRABLE if label else ROLE_UNDESIRABLE)


class _Prompt:
    """A row's prompt: its text, and its messages when it is a conversation."""

    def __init__(self, text: str, messages: list[dict] | None):
        self.text, self.messages = text, messages


def _prompt(row: dict[str, Any], cfg: DataSection, tokenizer: Any) -> _Prompt:
    value = require_field(row, cfg.prompt_field)
    if isinstance(value, str):
        return _Prompt(cfg.prompt_template.format(prompt=string_field(row, cfg.prompt_field)), None)
    messages = chat_messages(row, cfg.prompt_field, need_assistant=False, roles=cfg.roles)
    if messages[-1]["role"] == "assistant":
        raise RowError("the prompt's last message is the assistant's; the response goes in "
                       f"'{cfg.chosen_field}' / '{cfg.rejected_field}' (or "
                       f"'{cfg.completion_field}')", cfg.prompt_field)
    return _Prompt(_render(tokenizer, messages, cfg.prompt_field, generation_prompt=True), messages)


def _response(row: dict[str, Any], name: str, prompt: _Prompt, cfg: DataSection,
              tokenizer: Any) -> str:
    """The response's text as it follows the prompt."""
    value = require_field(row, name)
    if prompt.messages is None:
        if not isinstance(value, str):
            raise RowError(f"expected a string (the prompt is a string), got {json_type(value)}",
                           name)
        return string_field(row, name)
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty text", name)
        turns = [{"role": "assistant", "content": value}]
    else:
        turns = chat_messages(row, name, roles=cfg.roles)
    whole = _render(tokenizer, prompt.messages + turns, name, generation_prompt=False)
    if not whole.startswith(prompt.text):
        raise RowError("data.format: the tokenizer's chat template does not render the prompt "
                       "as a prefix of the conversation with its response, so the response "
                       "cannot be located; use string prompts and responses instead", fatal=True)
    return whole[len(prompt.text):]


def _render(tokenizer: Any, messages: list[dict], name: str, *, generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise RowError("chat messages need a tokenizer with a chat template, and this one has "
                       "none; write the prompt and responses as strings", name, fatal=True)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja's raise_exception and template bugs alike
        raise RowError(f"the chat template failed: {exc}", name) from None


def _example(prompt: _Prompt, response: str, cfg: DataSection, role: int) -> Segments:
    chat = prompt.messages is not None  # the template's own markers begin and end the turn
    return Segments([(prompt.text, False), (response, True)], bos=not chat,
                    eos=cfg.add_eos and not chat, role=role)
