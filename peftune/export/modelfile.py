'''An Ollama Modelfile for an exported GGUF file
(https://github.com/ollama/ollama/blob/main/docs/modelfile.md):

    FROM ./model.gguf
    TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}
    {{ .Content }}<|im_end|>
    {{ end }}<|im_start|>assistant
    """
    SYSTEM """the default system prompt, when the chat template has one"""
    PARAMETER stop "<|im_end|>"

Ollama renders prompts with Go templates, not Jinja, so the model's chat template is converted
by rendering it (transformers' `apply_chat_template`) on a conversation whose contents are
markers and reading the pieces back in the per-message form of ChatML, Llama 3 and most chat
templates: a leading text (BOS, or nothing), then per message `OPEN + role + ROLE_END +
content + TURN_END`, then the generation prompt `OPEN + "assistant" + ROLE_END`; a system
prompt the template inserts when the conversation has none becomes SYSTEM (Ollama puts it
first when a chat has no system message). The conversion is checked: the Jinja template and
the Go template's loop (plain concatenation, reproduced here) must render five conversations
identically. A template of any other shape is refused (write TEMPLATE by hand).

Stop parameters: the first special token that ends a turn (in TURN_END + OPEN, e.g.
<|im_end|>) and the EOS token.
'''

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftune.errors import InputError

_MARK = {"system": "SYSMARK0q", "user": "USRMARK1q", "assistant": "ASTMARK2q", "user2": "USRMARK3q"}


@dataclass(frozen=True)
class ChatPieces:
    lead: str  # before the first message (BOS text, or "")
    open: str  # before each message's role
    role_end: str  # between role and content
    turn_end: str  # after each message's content
    default_system: str | None  # inserted when a conversation has no system message

    def render(self, messages: list[dict]) -> str:
        """What the Go template (and Ollama's default system message) renders."""
        if self.default_system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        body = "".join(f"{self.open}{m['role']}{self.role_end}{m['content']}{self.turn_end}"
                       for m in messages)
        return f"{self.lead}{body}{self.open}assistant{self.role_end}"

    def go_template(self, *, drop_lead: bool) -> str:
        lead = "" if drop_lead else self.lead
        return (f"{lead}{{{{- range .Messages }}}}{self.open}{{{{ .Role }}}}{self.role_end}"
                f"{{{{ .Content }}}}{self.turn_end}{{{{ end }}}}{self.open}assistant{self.role_end}")


def chat_pieces(tokenizer: Any, *, flag: str = "--ollama") -> ChatPieces:
    """The chat template as ChatPieces, checked; one InputError line when it has another shape."""
    def render(messages: list[dict]) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - any failure: the template cannot be converted
            raise InputError(f"{flag}: the chat template cannot render a system/user/assistant "
                             f"conversation ({str(err).splitlines()[0][:80] if str(err) else type(err).__name__}); "
                             "write the Modelfile's TEMPLATE by hand") from None

    refuse = InputError(f"{flag}: the chat template is not of the per-message form a Go "
                        "template can reproduce (role and content wrapped the same way for every "
                        "message); write the Modelfile's TEMPLATE by hand")
    full = render([{"role": "system", "content": _MARK["system"]},
                   {"role": "user", "content": _MARK["user"]},
                   {"role": "assistant", "content": _MARK["assistant"]},
                   {"role": "user", "content": _MARK["user2"]}])
    parts = re.split("|".join(_MARK.values()), full)
    if len(parts) != 5:
        raise refuse
    first, between_user, before_assistant, after_assistant, generation = parts
    at = between_user.rfind("user")
    if at < 0 or first.rfind("system") < 0:
        raise refuse
    head, role_end = between_user[:at], between_user[at + len("user"):]
    start = first[:first.rfind("system")]
    common = len(_common_suffix(head, start))
    if not first.endswith("system" + role_end) or common == 0:
        raise refuse
    pieces = ChatPieces(lead=start[:len(start) - common], open=head[len(head) - common:],
                        role_end=role_end, turn_end=head[:len(head) - common], default_system=None)
    if not (before_assistant == head + "assistant" + role_end and after_assistant == between_user
            and generation == pieces.turn_end + pieces.open + "assistant" + role_end):
        raise refuse
    alone = render([{"role": "user", "content": _MARK["user"]}])
    if alone != pieces.render([{"role": "user", "content": _MARK["user"]}]):
        opening = pieces.lead + pieces.open + "system" + role_end
        closing = pieces.render([{"role": "user", "content": _MARK["user"]}])[len(pieces.lead):]
        if not (alone.startswith(opening) and alone.endswith(pieces.turn_end + closing)):
            raise refuse
        default = alone[len(opening):len(alone) - len(pieces.turn_end + closing)]
        pieces = ChatPieces(pieces.lead, pieces.open, role_end, pieces.turn_end, default)
    for messages in _CHECKS:
        if render(messages) != pieces.render(messages):
            raise refuse
    if any(bad in text for text in (pieces.lead, pieces.open, pieces.role_end, pieces.turn_end,
                                    pieces.default_system or "") for bad in ("{{", "}}", '"""')):
        raise refuse
    return pieces


_CHECKS = (
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [{"role": "user", "content": "one\ntwo"}, {"role": "assistant", "content": "x"},
     {"role": "user", "content": "y"}, {"role": "assistant", "content": "z"},
     {"role": "user", "content": "w"}],
)


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n:]


def stop_tokens(tokenizer: Any, pieces: ChatPieces | None) -> list[str]:
    """The end-of-turn token (the first special token between two messages) and EOS."""
    specials = sorted(set(tokenizer.all_special_tokens) | {
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
        if getattr(t, "special", False)}, key=len, reverse=True)
    found = []
    if pieces is not None:
        between = pieces.turn_end + pieces.open
        hits = [(between.find(t), t) for t in specials if t and between.find(t) >= 0]
        if hits:
            found.append(min(hits)[1])
    if tokenizer.eos_token and tokenizer.eos_token not in found:
        found.append(tokenizer.eos_token)
    return found


def modelfile_text(gguf_name: str, tokenizer: Any, *, add_bos: bool) -> str:
    """The Modelfile for `gguf_name` (a file beside it); raises InputError (one line) for a
    chat template that cannot be converted."""
    lines = ["# Ollama Modelfile written by peftune export. Create the model with:",
             "#   ollama create NAME -f Modelfile", f"FROM ./{gguf_name}"]
    pieces = chat_pieces(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    if pieces is not None:
        drop_lead = bool(pieces.lead) and pieces.lead == tokenizer.bos_token and add_bos
        lines.append(f'TEMPLATE """{pieces.go_template(drop_lead=drop_lead)}"""')
        if pieces.default_system:
            lines.append(f'SYSTEM """{pieces.default_system}"""')
    else:
        lines.append("# no chat template: Ollama feeds the prompt to the model as it is")
    for token in stop_tokens(tokenizer, pieces):
        lines.append(f"PARAMETER stop {_quoted(token)}")
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ollama_name(gguf_path: Path) -> str:
    """A model name Ollama accepts, from the file name (lower case, [a-z0-9._-])."""
    return re.sub(r"[^a-z0-9._-]+", "-", gguf_path.stem.lower()).strip("-._") or "model"
