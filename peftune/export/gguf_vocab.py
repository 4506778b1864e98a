"""A Hugging Face byte-level BPE tokenizer as GGUF vocabulary metadata: the `tokenizer.*` keys
of the GGUF spec (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md, "Tokenizer"), in
the layout llama.cpp's `gpt2` tokenizer model reads and transformers' GGUF reader rebuilds:

  tokenizer.ggml.model        "gpt2": byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen2)
  tokenizer.ggml.pre          llama.cpp's name for how text is split before the merges apply
  tokenizer.ggml.tokens       the token of every id, spelled as in tokenizer.json (bytes mapped
                              to printable characters: Ġ is a space); exactly the model's
                              vocab_size of them: unused ids are filled with [PADn], tokens
                              beyond the embedding's rows are left out (and reported)
  tokenizer.ggml.token_type   per id: 1 normal, 3 control (a special added token such as
                              <|im_end|>), 4 user-defined (an added token that is not special),
                              5 unused (the [PADn] fillers)
  tokenizer.ggml.merges       "left right" per merge, in rank order
  tokenizer.ggml.{bos,eos,unknown,padding}_token_id, add_bos_token, add_eos_token
  tokenizer.chat_template     the tokenizer's Jinja chat template, unchanged

SentencePiece-style vocabularies (byte-fallback BPE, unigram) are refused: GGUF spells them
another way (`llama` tokenizer model, scores), which this writer does not produce.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gguf import GGUFWriter, Keys, TokenType

from peftune.errors import InputError

# transformers' Split regexes that llama.cpp also names (their first name wins)
_KNOWN_PRE = ("llama-bpe", "qwen2", "tekken", "gpt-4o")


@dataclass
class GgufVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)  # Keys.Tokenizer name -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)

    def fields(self) -> dict[str, Any]:
        """Every key this vocabulary writes, with its value (what the read-back expects)."""
        found: dict[str, Any] = {
            Keys.Tokenizer.MODEL: "gpt2", Keys.Tokenizer.PRE: self.pre,
            Keys.Tokenizer.LIST: self.tokens, Keys.Tokenizer.TOKEN_TYPE: self.token_types,
            **self.special_ids,
            Keys.Tokenizer.ADD_BOS: self.add_bos, Keys.Tokenizer.ADD_EOS: self.add_eos,
        }
        if self.merges:  # a GGUF array cannot be empty: a vocabulary without merges has none
            found[Keys.Tokenizer.MERGES] = self.merges
        if self.chat_template:
            found[Keys.Tokenizer.CHAT_TEMPLATE] = self.chat_template
        return found

    def write(self, writer: GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.merges:
            writer.add_token_merges(self.merges)
        for key, token_id in self.special_ids.items():
            writer.add_uint32(key, token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def vocab_from_tokenizer(tokenizer: Any, *, vocab_size: int, source_pre: str | None = None,
                         where: str = "tokenizer") -> GgufVocab:
    """The GGUF vocabulary of a fast (tokenizers-backed) Hugging Face tokenizer; `vocab_size`
    is the model's (its embedding rows), `source_pre` the `tokenizer.ggml.pre` of the GGUF
    file the model came from, if any (it names the split exactly)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError(f"{where}: a slow (Python) tokenizer; the GGUF writer reads a fast "
                         "tokenizer's tokenizer.json (byte-level BPE)")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or not _byte_level(spec):
        kind = "byte-fallback BPE (SentencePiece style)" if model.get("byte_fallback") else \
            str(model.get("type") or "unknown")
        raise InputError(f"{where}: a {kind} vocabulary; the GGUF writer writes byte-level BPE "
                         "tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen2) only")
    tokens: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
    types = {i: int(TokenType.NORMAL) for i in tokens}
    for added in spec.get("added_tokens") or []:
        tokens[int(added["id"])] = added["content"]
        types[int(added["id"])] = int(TokenType.CONTROL if added.get("special")
                                      else TokenType.USER_DEFINED)
    beyond = sorted(i for i in tokens if i >= vocab_size)  # no embedding row: unusable
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre, note = _pre_name(spec.get("pre_tokenizer"), source_pre=source_pre, merges=bool(merges))
    vocab = GgufVocab(
        tokens=[tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)],
        token_types=[types.get(i, int(TokenType.UNUSED)) for i in range(vocab_size)],
        merges=merges, pre=pre, chat_template=_chat_template(tokenizer))
    if note:
        vocab.notes.append(note)
    if beyond:
        vocab.notes.append(f"{len(beyond)} tokenizer token(s) beyond the model's {vocab_size} "
                           f"embedding rows left out (the model cannot use them): "
                           f"{', '.join(f'{tokens[i]} ({i})' for i in beyond[:3])}")
    if not merges:
        vocab.notes.append("the tokenizer has no merges (every byte is a token): the file has "
                           "no tokenizer.ggml.merges, which llama.cpp requires")
    ids = {Keys.Tokenizer.BOS_ID: tokenizer.bos_token_id, Keys.Tokenizer.EOS_ID: tokenizer.eos_token_id,
           Keys.Tokenizer.UNK_ID: tokenizer.unk_token_id, Keys.Tokenizer.PAD_ID: tokenizer.pad_token_id}
    vocab.special_ids = {key: int(i) for key, i in ids.items() if i is not None and i < vocab_size}
    vocab.add_bos, vocab.add_eos = _adds_specials(tokenizer)
    return vocab


def _byte_level(spec: dict) -> bool:
    """Whether the tokenizer spells bytes as printable characters (a ByteLevel step)."""
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    return '"ByteLevel"' in text


def _pre_name(pre_tokenizer: dict | None, *, source_pre: str | None, merges: bool
              ) -> tuple[str, str | None]:
    """(llama.cpp pre-tokenizer name, a note when it had to be guessed)."""
    if source_pre:
        return source_pre, None
    if not merges:  # every byte its own token: how the text is split changes nothing
        return "default", None
    steps = (pre_tokenizer or {}).get("pretokenizers") or [pre_tokenizer or {}]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2", None
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, pattern in _transformers_splits().items():
            if pattern == regex:
                return name, None
    return "default", ("the tokenizer's pre-tokenizer has no llama.cpp name (wrote "
                       "tokenizer.ggml.pre = default): llama.cpp may split text differently")


def _transformers_splits() -> dict[str, str]:
    """{llama.cpp pre name: the Split regex} that transformers' GGUF reader rebuilds for it."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # another transformers: fall back to "default" with the note
        return {}
    return {name: GGUF_PRE_TOKENIZER_SPLITS[name] for name in _KNOWN_PRE
            if name in GGUF_PRE_TOKENIZER_SPLITS}


def _chat_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def _adds_specials(tokenizer: Any) -> tuple[bool, bool]:
    """(adds BOS, adds EOS): what encoding with special tokens puts around a plain text."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    if len(full) <= len(plain):
        return False, False
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (bos is not None and full[0] == bos and full[1:1 + len(plain)] == plain,
            eos is not None and full[-1] == eos and full[-1 - len(plain):-1] == plain)
