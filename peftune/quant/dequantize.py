"""The weights a quantized base computes with, as plain float tensors.

`dequantized_weight` reads one quantized linear layer (bitsandbytes nf4/fp4 and int8, HQQ
int4); `write_dequantized_base` writes a whole base as its recipe loads it quantized, every
quantized linear replaced by its dequantized weight: the base that an adapter starting from
the quantization error (LoftQ, EoRA's `quant.compensation`) was trained over, and the one
`peftune merge` folds such an adapter into.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def is_quantized_linear(layer: Any) -> bool:
    import bitsandbytes as bnb

    from peftune.quant.hqq import is_int4_layer

    return isinstance(layer, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt) or is_int4_layer(layer)


def dequantized_weight(layer: Any) -> Any:
    """The weight a quantized linear layer computes with (out x in, float32)."""
    import bitsandbytes as bnb
    import torch

    if isinstance(layer, bnb.nn.Linear4bit):
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        return weight.to(torch.float32).reshape(layer.out_features, layer.in_features)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        # LLM.int8()'s row-wise absmax codes: W ≈ codes·SCB/127, one scale per row (the
        # parameter holds the int8 codes; bitsandbytes drops its CB alias after a forward)
        scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        codes = layer.weight.data
        return codes.to(torch.float32) * (scales.to(torch.float32)[:, None] / 127.0)
    return layer.dequantize().to(torch.float32)


def dequantize_model(model: Any) -> Any:
    """Replace every quantized linear layer of `model` by an `nn.Linear` holding its
    dequantized weight (float32), in place; the quantization config is dropped."""
    import torch

    with torch.no_grad():
        for parent in list(model.modules()):
            for attr, child in list(parent.named_children()):
                if not is_quantized_linear(child):
                    continue
                weight = dequantized_weight(child)
                linear = torch.nn.Linear(weight.shape[1], weight.shape[0],
                                         bias=child.bias is not None, device=weight.device,
                                         dtype=torch.float32)
                linear.weight.copy_(weight)
                if child.bias is not None:
                    linear.bias.copy_(child.bias.to(torch.float32))
                setattr(parent, attr, linear)
    for name in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, name):
            delattr(model.config, name)
    for name in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit", "hqq_quantized",
                 "quantization_method", "hf_quantizer"):
        if getattr(model, name, None):
            setattr(model, name, None if name in ("quantization_method", "hf_quantizer")
                    else False)
    return model


def write_dequantized_base(model_section: Any, quant_section: Any, out: Path, *,
                           dtype: Any) -> Path:
    """Load the base as `quant_section` quantizes it, dequantize it, and save it (safetensors,
    every tensor in `dtype`, the tokenizer beside) to `out`; returns `out`."""
    import torch

    from peftune.models import load_model, load_tokenizer, resolve_model_path

    model = load_model(model_section, quant_section, device=torch.device("cpu"))
    model = dequantize_model(model).to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(resolve_model_path(model_section.path),
                   trust_remote_code=model_section.trust_remote_code).save_pretrained(out)
    return out
