"""int4: 4-bit integer weight-only quantization with HQQ (Badri & Shaji 2023, "Half-Quadratic
Quantization of Large Machine Learning Models"), trained over with LoRA through peft.

Each weight row is cut into groups of `quant.group_size` inputs; a group stores 4-bit codes
q in [0, 15] plus its own scale s and zero z, and dequantizes as W = (q - z)·s. HQQ keeps
the min-max scale and moves z by a few half-quadratic (proximal) steps that minimise the l_p
(p = 0.7) error |W - (q - z)·s|, with no calibration data. Quantizing is a pure function of
the weights (no randomness): the same checkpoint gives the same codes (tested; identical with
1 and 2 CPU threads too), so a resumed run or a merge re-quantizes to the base it trained on.
Codes are packed two per byte (`W_q`: uint8, in·out/2 bytes); scales and zeros stay in
`quant.compute_dtype`, one pair per group. `double_quant` (quantizing those scales and zeros)
is not offered: hqq 0.2.8 ignores it. In the forward pass a layer dequantizes its weight and
runs the matmul in `quant.compute_dtype`, casting its input to that dtype and its output back
(like bitsandbytes), so a fp32 model with bf16 compute works. The frozen base takes no
gradient; peft's `HqqLoraLinear` adds the trainable low-rank update on top.

Why hqq used directly, checked on CPU (torch 2.13, transformers 5.24, peft 0.21.2):
- `hqq` 0.2.8 (`HQQLinear`, nbits 4): real 4-bit storage, LoRA and DoRA train through peft,
  an eval pass leaves later gradients unchanged (no bitsandbytes-like repacking; tested).
- transformers' `HqqConfig`: from_pretrained raises "QuantizationMethod.HQQ is not
  available yet".
- optimum-quanto 0.2.7 qint4: packed 4-bit, LoRA trains, but the model `merge_and_unload`
  returns has exactly the base's logits (the update is dropped, silently).
- torchao 0.18 `Int4WeightOnlyConfig`: fails on CPU (needs the `mslk` kernels);
  `IntxWeightOnlyConfig(int4)` stores the codes in int8 (no 4-bit saving), and peft's merge
  over it fails.

Memory, measured: bytes of the stored weights plus scales and zeros (4 + 2·16/group bits per
weight with bf16 scales; 4 + 2·32/group with fp32 ones), against fp32:
  tiny test model (Llama, hidden 32, 2 layers, vocabulary 261), group 32:
    linears 72.0 KiB -> 13.5 KiB with fp32 scales (5.3x), 11.2 KiB with bf16 (6.4x);
    whole model 137.9 KiB -> 79.4 KiB (the embeddings and lm_head stay full precision and
    dominate at this size)
  hidden 512, 8 layers, group 64: linears 72.0 MiB -> 10.1 MiB with bf16 scales (7.1x);
    whole model 73.1 MiB -> 11.2 MiB; quantizing took ~2-4 s on 2 CPU cores.
The unquantized model is loaded first, so loading peaks at its full-precision size.

Merging: peft's `merge_and_unload` on an HQQ layer re-quantizes W + ΔW to 4 bits, a new
approximation (measured on the tiny model: logits off by 0.12 from the unmerged model's, where
the adapter had moved them by 0.75). `dequantize_int4` turns every 4-bit layer back into a plain
`nn.Linear` holding exactly the weights training saw; merging an adapter into that model is
exact up to float rounding (tested).
"""

from __future__ import annotations

import functools
from typing import Any

from peftune.errors import InputError

NBITS = 4
# HQQ groups along the input dimension (axis 1): each group is `group_size` consecutive
# inputs of one output row, the layout HQQ recommends for 4-bit quality.
AXIS = 1

@functools.cache
def int4_linear_class() -> Any:
    """The 4-bit layer class: hqq's `HQQLinear` plus the compute-dtype cast of its input.

    A subclass, so that peft's HQQ dispatch (`isinstance(..., HQQLinear)`) picks it up, and
    named `HQQLinear` too: peft reads HQQ layers' sizes only from a class of that name. hqq's
    `set_backend` assigns `forward = forward_pytorch_backprop` on the class, so the cast
    overrides that method rather than `forward`.
    """
    from hqq.core import quantize

    class HQQLinear(quantize.HQQLinear):
        def forward_pytorch_backprop(self, x: Any) -> Any:
            if x.dtype == self.compute_dtype:
                return super().forward_pytorch_backprop(x)
            return super().forward_pytorch_backprop(x.to(self.compute_dtype)).to(x.dtype)

    return HQQLinear


def quantize_model_int4(model: Any, *, group_size: int, compute_dtype: Any, device: Any) -> Any:
    """Replace every `nn.Linear` of `model` except the output head by a 4-bit HQQ layer.

    The model must already be on `device` (the quantizer runs where the weights are). Every
    layer's input size is checked against `group_size` before anything is quantized.
    """
    import torch
    from hqq.core.quantize import BaseQuantizeConfig

    targets = _linear_targets(model)
    bad = [(name, child.in_features) for name, _, _, child in targets
           if child.in_features % group_size]
    if bad:
        name, width = bad[0]
        raise InputError(
            f"quant.group_size: {group_size} does not divide the input size {width} of {name} "
            f"({len(bad)} layer{'s' if len(bad) > 1 else ''}); use a group size that divides "
            f"it, such as {_largest_valid_group(width, group_size)}"
        )
    config = BaseQuantizeConfig(nbits=NBITS, group_size=group_size, axis=AXIS)
    layer_class = int4_linear_class()
    with torch.no_grad():
        for _, parent, attr, child in targets:
            layer = layer_class(child, config, compute_dtype=compute_dtype, device=str(device),
                                del_orig=True)
            setattr(parent, attr, layer)
    # peft's k-bit preparation reads this: freeze, but do not upcast the (uint8) base.
    model.hqq_quantized = True
    return model


def _linear_targets(model: Any) -> list[tuple[str, Any, str, Any]]:
    """(qualified name, parent, attribute, layer) of each nn.Linear to quantize."""
    import torch

    head = model.get_output_embeddings()
    targets = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, torch.nn.Linear) and child is not head:
                name = f"{parent_name}.{attr}" if parent_name else attr
                targets.append((name, parent, attr, child))
    return targets


def _largest_valid_group(width: int, group_size: int) -> int:
    """The largest multiple of 8 up to `group_size` that divides `width` (else 8)."""
    for size in range(group_size - group_size % 8, 7, -8):
        if width % size == 0:
            return size
    return 8


def is_int4_layer(module: Any) -> bool:
    from hqq.core.quantize import HQQLinear

    return isinstance(module, HQQLinear)


def dequantize_int4(model: Any, *, dtype: Any = None) -> Any:
    """Replace every 4-bit HQQ layer of `model` by an `nn.Linear` holding its dequantized
    weight (in `dtype`, default the layer's compute dtype), in place; the model then merges
    adapters exactly. Apply it to the base before loading an adapter onto it."""
    import torch

    with torch.no_grad():
        for parent in list(model.modules()):
            for attr, child in list(parent.named_children()):
                if not is_int4_layer(child):
                    continue
                weight = child.dequantize()
                target = dtype or weight.dtype
                linear = torch.nn.Linear(child.in_features, child.out_features,
                                         bias=child.bias is not None, device=weight.device,
                                         dtype=target)
                linear.weight.copy_(weight.to(target))
                if child.bias is not None:
                    linear.bias.copy_(child.bias.to(target))
                setattr(parent, attr, linear)
    if getattr(model, "hqq_quantized", False):
        model.hqq_quantized = False
    return model
