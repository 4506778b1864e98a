"""Quantization backends for the frozen base, keyed by `quant.method`.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): a 4-bit
NormalFloat (nf4) or fp4 base, optionally double-quantized, computing in a higher-precision
dtype, with adapters kept in full precision. LLM.int8() (Dettmers et al. 2022) for `int8`.
Both come from bitsandbytes through transformers' `BitsAndBytesConfig`.

`int4` is HQQ's 4-bit integer quantization (`peftune.quant.hqq`, which says why HQQ): the
model loads unquantized and its linear layers are then replaced by 4-bit ones.

`quant.compensation: eora` (`peftune.quant.eora`) starts the LoRA adapter as a low-rank
correction of the quantization error; `peftune.quant.compensate` is `peftune compensate`, and
`peftune.quant.dequantize` gives the weights a quantized base computes with.

The backends read the recipe's `quant:` section through `QuantSettings`, the keys they use,
so that this package does not depend on the recipe schema (the schema's section has them).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from peftune import compat


class QuantSettings(Protocol):
    """What the backends read of `quant:` (`peftune.recipe.schema.QuantSection` has it)."""

    method: str  # none, nf4, fp4, int8, int4
    double_quant: bool
    compute_dtype: str  # auto, float32, bfloat16, float16
    storage_dtype: str  # nf4/fp4: the dtype the packed 4-bit codes are stored in
    group_size: int | None  # int4: inputs per group


@dataclass(frozen=True)
class QuantBackend:
    name: str
    # -> the `quantization_config` for from_pretrained; None: quantized after loading
    load_config: Callable[[QuantSettings, Any], Any] | None  # (section, device)
    bits: int


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "uint8": torch.uint8}[name]


def compute_dtype(quant: QuantSettings, device: Any) -> Any:
    """The torch dtype quantized layers compute in on `device` (`auto` resolved)."""
    import torch

    from peftune.device import native_bf16

    if quant.compute_dtype != "auto":
        return _torch_dtype(quant.compute_dtype)
    if native_bf16(device):
        return torch.bfloat16
    return torch.float16 if getattr(device, "type", "cpu") == "cuda" else torch.float32


def _bnb_4bit(quant_type: str) -> Callable[[QuantSettings, Any], Any]:
    def config(quant: QuantSettings, device: Any) -> Any:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=compute_dtype(quant, device),
            bnb_4bit_quant_storage=_torch_dtype(quant.storage_dtype),
        )

    return config


def _bnb_int8(quant: QuantSettings, device: Any) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


BACKENDS: dict[str, QuantBackend] = {
    "nf4": QuantBackend("nf4", _bnb_4bit("nf4"), bits=4),
    "fp4": QuantBackend("fp4", _bnb_4bit("fp4"), bits=4),
    "int8": QuantBackend("int8", _bnb_int8, bits=8),
    "int4": QuantBackend("int4", None, bits=4),
}


def quantization_config(quant: QuantSettings, *, device: Any) -> Any | None:
    """The `quantization_config` to load the base with; None for `quant.method: none` and
    for backends that quantize the loaded model (`int4`)."""
    backend = BACKENDS.get(quant.method)
    if backend is None or backend.load_config is None:
        return None
    _quiet_bitsandbytes()
    return backend.load_config(quant, device)


def prepare_quantized_model(model: Any, quant: QuantSettings, *, device: Any) -> Any:
    """Make a freshly loaded model quantized (if it is not yet), safe, and ready to train
    adapters on.

    int4: moves the unquantized model to `device` and replaces its linears by HQQ 4-bit
    layers. bitsandbytes: disables its AVX512-BF16 weight repacking on CPU, which after an
    eval forward silently corrupts the LoRA gradients of later training steps
    (`compat.disable_bnb_cpu_bf16_repacking`). Then peft's k-bit preparation (frozen base, fp32 norms for bnb);
    activation checkpointing is the loader's (models/loading.py), as for any base. Last, the
    tensors left unquantized get memory of their own, which releases the checkpoint's memory
    map: on CPU it otherwise stays resident whole (`peftune.quant.memory`).
    """
    from peft import prepare_model_for_kbit_training

    from peftune.quant.memory import own_unquantized_tensors

    if quant.method == "int4":
        from peftune.quant.hqq import quantize_model_int4

        model.to(device)
        model = quantize_model_int4(model, group_size=quant.group_size,
                                    compute_dtype=compute_dtype(quant, device), device=device)
    else:
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                compat.disable_bnb_cpu_bf16_repacking(module)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    own_unquantized_tensors(model)
    return model


def _quiet_bitsandbytes() -> None:
    # bnb 0.50 warns on every int8 matmul that fp32 inputs are cast to fp16: expected here.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
