"""`peftune chat`: talk to a training run or a model in the terminal.

The target resolves as `peftune eval`'s does (`peftune.evaluate.targets`): a run directory
(its recipe names the base, and it holds `adapter/` or `model/`), a model directory, a PEFT
adapter directory, or a model source (.gguf file, catalogue name, hub id) with `--adapter`.
Each turn is rendered by the tokenizer's chat template with the generation prompt added
(`--raw`: the text as is, history concatenated) and answered by `model.generate` as eval's
generate task answers: greedy at temperature 0, else sampled with `temperature` and `top_p`
(seeded per turn, the same seed for both sides of `--compare base`), stopping at EOS and at
the template's end-of-turn token. Tokens are printed as they are generated.

`--compare base` answers every turn twice: with the adapter, then without it (peft's
`disable_adapter()`, so the base is not loaded twice; a full fine-tune's base is loaded
beside it). Each side keeps its own history.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from peftune.errors import InputError
from peftune.evaluate.targets import Target, resolve_target, run_base

FLAG = "RUN|MODEL"
QUANTS = ("none", "nf4", "fp4", "int8", "int4")
COMMANDS = "/reset clears the history, /quit or Ctrl-D ends, Ctrl-C stops an answer"


@dataclass
class Turn:
    """One answer: which side gave it, the prompt ids it was generated from, the text, and
    whether Ctrl-C cut it short."""

    side: str
    prompt_ids: list[int]
    answer: str
    stopped: bool = False


@dataclass
class Generation:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Side:
    """One model of the conversation (the target, or its base) and its own history."""

    label: str
    loaded: Any  # peftune.evaluate.targets.Loaded
    raw: bool
    system: str | None
    adapter_off: bool = False  # the base of a peft model: generate under disable_adapter()
    context: int = 2048
    stop_ids: list[int] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    last: Turn | None = None  # the latest answer, also when Ctrl-C cut it short

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def render(self, messages: list[dict]) -> list[int]:
        tokenizer = self.loaded.tokenizer
        if self.raw:
            from peftune.data.formats import leading_special_ids

            text = "".join(m["content"] + ("" if m["role"] == "user" else "\n") for m in messages)
            return leading_special_ids(tokenizer) + \
                tokenizer(text, add_special_tokens=False)["input_ids"]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as exc:  # jinja's raise_exception (e.g. no system role) and bugs alike
            first = str(exc).strip().splitlines()
            raise InputError(f"{self.label}: the chat template failed: "
                             f"{first[0] if first else type(exc).__name__}") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, text: str, room: int, status: TextIO) -> list[int]:
        """The conversation so far plus `text`, rendered; the oldest exchanges are dropped
        (for good) while it leaves fewer than `room` tokens of the context to answer in."""
        keep = max(1, self.context - room)
        ids = self.render(self.messages + [{"role": "user", "content": text}])
        first = 1 if self.system else 0
        dropped = 0
        while len(ids) > keep and len(self.messages) - first >= 2:
            del self.messages[first:first + 2]
            dropped += 1
            ids = self.render(self.messages + [{"role": "user", "content": text}])
        if dropped:
            print(f"({self.label}: dropped the {dropped} oldest exchange(s) to fit the "
                  f"{self.context}-token context)", file=status)
        if len(ids) > keep:
            print(f"({self.label}: the message is too long; only its last {keep} tokens are "
                  "read)", file=status)
        return ids[-keep:]

    def answer(self, text: str, settings: Generation, *, turn: int, out: TextIO,
               status: TextIO) -> Turn:
        """Generate the answer to `text`, printing it as it comes; remember the exchange.
        Ctrl-C (KeyboardInterrupt) during generation is raised again after the partial
        answer is remembered and marked `stopped` in `self.last`."""
        import torch

        self.last = None
        ids = self.prompt_ids(text, settings.max_new_tokens, status)
        printer = Printer(self.loaded.tokenizer, out)
        model = self.loaded.model
        device = next(model.parameters()).device
        sampled = settings.temperature > 0
        options: dict[str, Any] = dict(max_new_tokens=settings.max_new_tokens,
                                       do_sample=sampled, use_cache=True, streamer=printer,
                                       pad_token_id=self.loaded.tokenizer.pad_token_id)
        if sampled:
            options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
            torch.manual_seed(settings.seed + turn)  # both sides of a turn draw alike
        else:
            options.update(temperature=None, top_p=None, top_k=None)
        if self.stop_ids:
            options["eos_token_id"] = self.stop_ids
        switch = model.disable_adapter() if self.adapter_off else contextlib.nullcontext()
        tensor = torch.tensor([ids], device=device)
        stopped = False
        try:
            with torch.inference_mode(), switch, warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Position ids are not supported")
                model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor),
                               **options, **self.loaded.extra(1))
        except KeyboardInterrupt:
            stopped = True
        printer.finish()
        self.messages += [{"role": "user", "content": text},
                          {"role": "assistant", "content": printer.text()}]
        self.last = Turn(self.label, ids, printer.text(), stopped)
        if stopped:
            raise KeyboardInterrupt
        return self.last


class Printer:
    """A transformers streamer that writes the answer as it is generated: the decoded text
    of all new tokens, less what is already printed; a trailing U+FFFD (a character whose
    bytes have not all arrived) waits for the next token."""

    def __init__(self, tokenizer: Any, out: TextIO):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        self._write(self.text().rstrip("\ufffd"))

    def end(self) -> None:
        self._write(self.text())

    def finish(self) -> None:
        """After generate() returned or was interrupted: the rest, and the line's end."""
        self._write(self.text())
        self.out.write("\n")
        self.out.flush()

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _write(self, text: str) -> None:
        if len(text) > self.printed:
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


def run_chat(*, target: str, adapter: str | None = None, prompt: str | None = None,
             compare: str | None = None, raw: bool = False, system: str | None = None,
             max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, quant: str | None = None, out: TextIO | None = None,
             status: TextIO | None = None) -> list[Turn]:
    """Chat with `target` (a run, model or adapter directory, or a model source with
    `adapter`): answer `prompt` once, or read turns from stdin until /quit or EOF. Answers
    go to `out` (stdout), loading lines to `status` (stderr). Returns every answer given.
    Ctrl-C at the prompt (or while loading) raises KeyboardInterrupt."""
    out = out or sys.stdout
    status = status or sys.stderr
    settings = check_settings(max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed, quant=quant, compare=compare,
                              prompt=prompt)
    primary = resolve_chat_target(target, adapter=adapter, quant=quant)
    base = None
    if compare == "base":
        if primary.adapter is None and primary.run is None:
            raise InputError(f"--compare base: {primary.label} is a model without an adapter, "
                             "so it has no base to compare with; chat with a run directory or "
                             "MODEL --adapter DIR")
        base = run_base(primary)
    sides = load_sides(primary, base, raw=raw, system=system, status=status)
    if prompt is not None:
        return [side.answer(prompt, settings, turn=0, out=_labelled(side, sides, out),
                            status=status) for side in sides]
    return converse(sides, settings, name=primary.label, out=out, status=status)


def check_settings(*, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                   quant: str | None, compare: str | None, prompt: str | None) -> Generation:
    """Every flag problem at once, one line each (eval's wording), before anything loads."""
    problems = []
    if not max_new_tokens > 0:
        problems.append(f"--max-new-tokens: must be > 0, got {max_new_tokens}")
    if not temperature >= 0:
        problems.append(f"--temperature: must be >= 0, got {temperature:g}")
    if not 0 < top_p <= 1:
        problems.append(f"--top-p: must be > 0 and <= 1, got {top_p:g}")
    if quant is not None and quant not in QUANTS:
        problems.append(f"--quant {quant}: must be one of {', '.join(QUANTS)}")
    if compare is not None and compare != "base":
        problems.append(f"--compare {compare}: chat compares with `base` only (the same "
                        "model without its adapter)")
    if prompt is not None and not prompt.strip():
        problems.append("--prompt: empty; give the text to answer")
    if problems:
        raise InputError(*problems)
    return Generation(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      seed=seed)


def resolve_chat_target(target: str, *, adapter: str | None, quant: str | None) -> Target:
    """A directory (run, model or adapter) resolves as eval's TARGET; anything else (a .gguf
    file, a catalogue name, a hub id) as eval's --model, with `adapter` on it. Torch-free,
    except that a .gguf file or catalogue model is converted (once) here."""
    from peftune.evaluate.targets import looks_local
    from peftune.models.catalogue import looks_like_catalogue_name
    from peftune.models.sources import is_gguf, resolve_model_path

    path = Path(target).expanduser()
    local = path.exists() or looks_local(target) or (path.parent != Path(".")
                                                      and path.parent.is_dir())
    if path.is_dir() or (local and not is_gguf(target)):
        resolved = resolve_target(target, quant=quant, flag=FLAG)
        if adapter is None:
            return resolved
        if resolved.adapter is not None or resolved.run is not None:
            raise InputError(f"--adapter {adapter}: {target} is a run or adapter directory, "
                             "which brings its own; give MODEL --adapter DIR with the base "
                             "model as MODEL")
        return resolve_target(target, adapter=adapter, quant=quant, flag=FLAG)
    if is_gguf(target) and not path.is_file():
        raise InputError(f"{FLAG} {target}: no such model directory or .gguf file; give a "
                         "training run directory, a model directory, a .gguf file, a catalogue "
                         "model (peftune pull lists them) or a hub id in the local cache")
    if is_gguf(target) or looks_like_catalogue_name(target):
        model = resolve_model_path(target, key=FLAG)  # pulled and converted once, then cached
    else:
        model = target  # a hub id
        if not _hub_model_cached(target):
            raise InputError(f"{FLAG} {target}: no such run or model directory, and no hub "
                             "model of that name in the local cache (offline); give a training "
                             "run directory (with recipe.yaml), a model directory, a .gguf "
                             "file or a catalogue model (peftune pull lists them)")
    resolved = resolve_target(None, model=model, adapter=adapter, quant=quant)
    if adapter is None:
        resolved.label = target
    return resolved


def _hub_model_cached(repo_id: str) -> bool:
    """False only when offline and the hub id has no config.json in the local cache
    (online, the loader downloads it or says why not)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return True
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def load_sides(primary: Target, base: Target | None, *, raw: bool, system: str | None,
               status: TextIO) -> list[Side]:
    """The tokenizer first (a model without a chat template is refused before its weights
    load), then the model(s): the target, and its base for `--compare base`."""
    from peftune.evaluate.generate import end_of_turn_ids
    from peftune.evaluate.targets import load_target
    from peftune.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(primary.model.path),
                               trust_remote_code=primary.model.trust_remote_code)
    if not raw and not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{FLAG} {primary.label}: the model's tokenizer has no chat template "
                         "(a base model, not an instruct one?); give --raw to feed your text "
                         "as is")
    device = _device()
    what = primary.model.path + (f" + adapter {primary.adapter}" if primary.adapter else "")
    print(f"loading {primary.label} ({what}; {device.type})", file=status)
    loaded = load_target(primary, device=device)
    label = "fine-tuned" if base is not None else primary.label
    sides = [_side(label, loaded, raw=raw, system=system)]
    if base is not None:
        if primary.adapter is not None and hasattr(loaded.model, "disable_adapter"):
            sides.append(_side("base", loaded, raw=raw, system=system, adapter_off=True))
        else:  # a full fine-tune, or an adapter peft cannot switch off: load the base too
            print(f"loading the base {base.model.path} ({device.type})", file=status)
            sides.append(_side("base", load_target(base, device=device), raw=raw,
                               system=system))
    for side in sides:  # a template that refuses the system role says so now
        side.render(side.messages + [{"role": "user", "content": "hi"}])
    for side in sides:  # EOS, and the template's end-of-turn token (ChatML's <|im_end|>)
        stops = [] if raw else end_of_turn_ids(side.loaded.tokenizer)
        eos = side.loaded.tokenizer.eos_token_id
        side.stop_ids = sorted(set(stops + ([eos] if eos is not None else [])))
    return sides


def _side(label: str, loaded: Any, *, raw: bool, system: str | None,
          adapter_off: bool = False) -> Side:
    config = loaded.model.config
    context = int(getattr(config, "max_position_embeddings", None) or 2048)
    return Side(label=label, loaded=loaded, raw=raw, system=system, adapter_off=adapter_off,
                context=context)


def converse(sides: list[Side], settings: Generation, *, name: str, out: TextIO,
             status: TextIO) -> list[Turn]:
    """Read a line, answer it on every side, until /quit or EOF. Ctrl-C during an answer
    stops it (and the turn) and returns to the prompt; at the prompt it is raised."""
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    print(f"chatting with {name}" + (" and its base" if len(sides) > 1 else "")
          + f": {COMMANDS}", file=status)
    turns: list[Turn] = []
    number = 0
    while True:
        try:
            text = input(">>> " if tty else "")
        except EOFError:
            if tty:
                out.write("\n")
            return turns
        except KeyboardInterrupt:
            if tty:
                out.write("\n")
                out.flush()
            raise
        command = text.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            return turns
        if command == "/reset":
            for side in sides:
                side.reset()
            print("(history cleared)", file=status)
            continue
        if command.startswith("/") and " " not in command:
            print(f"unknown command {command}: {COMMANDS}", file=status)
            continue
        number += 1
        for side in sides:
            try:
                turns.append(side.answer(text, settings, turn=number,
                                         out=_labelled(side, sides, out), status=status))
            except KeyboardInterrupt:
                if side.last is not None:  # None: stopped before generation began
                    turns.append(side.last)
                print("(stopped)", file=status)
                break


def _labelled(side: Side, sides: list[Side], out: TextIO) -> TextIO:
    """With --compare, each answer opens with its side's label on a line of its own."""
    if len(sides) > 1:
        out.write(f"[{side.label}]\n")
        out.flush()
    return out


def _device() -> Any:
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
