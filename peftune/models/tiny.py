"""The tiny-model builder used by tests and `peftune tiny-model`: a randomly initialised
small causal LM and a byte-level tokenizer with a chat template, written in Hugging Face
format so that everything can be tried with no downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftune.errors import InputError

# The byte-level tokenizer's special tokens and its chat template (ChatML-style).
PAD, BOS, EOS, IM_START, IM_END = "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_byte_tokenizer() -> Any:
    """A byte-level tokenizer with no merges: every UTF-8 byte is one token (256 + 5 specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, IM_START, IM_END]
    vocab = {token: i for i, token in enumerate(specials)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    # Like Llama's tokenizers, prepend BOS when asked for special tokens.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END], model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    out_dir: str | Path, *, arch: str = "llama", hidden_size: int = 64, layers: int = 2,
    heads: int = 4, seed: int = 0, max_positions: int = 2048,
) -> Path:
    """Write a randomly initialised small causal LM and its byte-level tokenizer to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    from peftune.models.quiet import quiet_libraries

    quiet_libraries()
    if hidden_size % heads:
        raise InputError(f"--hidden-size {hidden_size} must be a multiple of --heads {heads}")
    out = Path(out_dir)
    tokenizer = build_byte_tokenizer()
    config = _tiny_config(arch, vocab_size=len(tokenizer), hidden_size=hidden_size, layers=layers,
                          heads=heads, max_positions=max_positions, tokenizer=tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _tiny_config(arch: str, *, vocab_size: int, hidden_size: int, layers: int, heads: int,
                 max_positions: int, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2) if heads % 2 == 0 else heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise InputError(f"--arch {arch}: unknown tiny architecture; choose llama or qwen2")
