"""LoftQ initialisation (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for
Large Language Models", arXiv:2310.08659) over a bitsandbytes 4-bit base, on any device.

For every LoRA layer on a 4-bit linear: Q = dequantize(q(W)) is what the base computes
with; the top-r SVD of the quantization error W - Q = U·S·Vᵀ gives A = √S_r·V_rᵀ and
B = U_r·√S_r / scaling, so that Q + scaling·B·A is the best rank-r correction of Q toward
W. This is one step of the paper's alternation: the base stays exactly q(W) (what loading
W in 4-bit gives), so the exported adapter applies to the usual 4-bit base. peft's own
`loftq_init` / `replace_lora_weights_loftq` compute on a CUDA device only.

W is read from the model's safetensors files, one tensor at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftune import compat
from peftune.errors import InputError


def loftq_initialise(peft_model: Any, model_path: str) -> dict:
    """Set A, B of every 4-bit LoRA layer; returns the relative error before and after."""
    import bitsandbytes as bnb
    import torch

    read = weight_reader(Path(model_path), key="adapter.method loftq")
    before = after = norm = 0.0
    layers = 0
    prefix = "base_model.model."
    for name, module in compat.lora_4bit_layers(peft_model):
        base = module.get_base_layer()
        weight = read(name.removeprefix(prefix) + ".weight").to(torch.float32)
        quantized = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
        error = weight - quantized.to(torch.float32).reshape(weight.shape)
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        r, scaling, lora_a, lora_b = compat.lora_factors(module)
        root = s[:r].sqrt()
        a, b = root[:, None] * vh[:r], u[:, :r] * root / scaling
        with torch.no_grad():
            lora_a.copy_(a.to(lora_a.dtype))
            lora_b.copy_(b.to(lora_b.dtype))
        before += float(error.pow(2).sum())
        after += float((error - scaling * b @ a).pow(2).sum())
        norm += float(weight.pow(2).sum())
        layers += 1
    if layers == 0:
        raise InputError("adapter.method loftq: no LoRA layer sits on a 4-bit linear layer; "
                         "set quant.method: nf4 or fp4 and target linear layers")
    return {"loftq_layers": layers,
            "quant_error_before": round((before / norm) ** 0.5, 6),
            "quant_error_after": round((after / norm) ** 0.5, 6)}


def weight_reader(model_dir: Path, *, key: str) -> Any:
    """name -> tensor from `model.safetensors` or a sharded safetensors index; `key` names
    what needs the weights in the refusal when there are none."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shard_of = json.loads(index.read_text())["weight_map"]
    elif (model_dir / "model.safetensors").is_file():
        shard_of = None
    else:
        raise InputError(f"{key}: {model_dir} has no safetensors weights to "
                         "compute the quantization error from")

    def read(name: str) -> Any:
        shard = shard_of[name] if shard_of is not None else "model.safetensors"
        with safe_open(str(model_dir / shard), framework="pt") as handle:
            return handle.get_tensor(name)

    return read
