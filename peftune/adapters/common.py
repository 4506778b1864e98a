"""Pieces every method's hooks share: the trainable state a checkpoint holds, the export,
parameter counts, and the decoder layers of a model (also used by the training strategies)."""

from __future__ import annotations

from typing import Any

from peftune.errors import InputError


def trainable_state(model: Any) -> dict:
    """The tensors that train (by parameter name), detached copies on the CPU."""
    return {
        name: param.detach().to("cpu", copy=True).contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def load_trainable_state(model: Any, state: dict) -> None:
    """Copy a `trainable_state` back into the model, checking that the names match exactly."""
    import torch

    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def save_with_tokenizer(model: Any, out_dir: Any, tokenizer: Any = None) -> None:
    """`save_pretrained` in safetensors, with the tokenizer beside it when there is one.

    A PEFT model never saves its base embedding / output layers (peft does by default when
    an adapter targets lm_head or embed_tokens: a 115 MB "adapter" for a 135M model): peftune
    does not resize vocabularies, so those weights are the base's own, unchanged."""
    extra = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}
    model.save_pretrained(out_dir, safe_serialization=True, **extra)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights (bitsandbytes' Params4bit,
    HQQ's uint8 `W_q`) count two weights per stored byte."""
    import torch

    trainable = total = 0
    for name, param in model.named_parameters():
        n = param.numel()
        if type(param).__name__ == "Params4bit" or (
                name.endswith("W_q") and param.dtype == torch.uint8):
            n *= 2  # two 4-bit values per stored byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def decoder_layers(model: Any) -> list[Any]:
    """The decoder's blocks: the longest ModuleList of the model (`model.layers`, `h`, ...)."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise InputError("adapter.layers: cannot find the decoder layers of this model; use "
                         "adapter.modules to name the parameters to train")
    return list(max(lists, key=len))
