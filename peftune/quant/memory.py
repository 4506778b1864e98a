"""What a quantized base keeps in memory besides its quantized weights, on CPU.

transformers loads a safetensors checkpoint through a memory map: a weight of a plain model is
a view of the file's pages, read on first use and counted in the process's RSS as file pages
(the fp32 base's 0.54 GB in docs/memory.md). Quantizing reads every linear weight, so every
page of the file becomes resident, and the tensors the quantizer leaves unquantized (the
embeddings, a tied or untied head, the norms) still view the map: the whole file stays mapped
and resident for as long as they live. Measured on SmolLM2-135M (nf4, 538 MB checkpoint):
0.51 GB of file pages after loading and through training, although the nf4 weights are 0.05
GB and the embedding 0.11 GB (scripts/bench_qlora_memory.py).

`own_unquantized_tensors` copies those tensors into the process's own memory, so the map is
released with its pages; the copies hold the same values (training is unchanged, bit for bit).
"""

from __future__ import annotations

from typing import Any


def own_unquantized_tensors(model: Any) -> int:
    """Give every plain CPU floating-point parameter and buffer of `model` its own memory (a
    copy) instead of a view of the checkpoint's memory map, keeping shared tensors shared (a
    tied embedding and head stay one tensor). Quantized parameters (subclasses of Parameter,
    such as bitsandbytes' Params4bit) already live in process memory and are left alone.
    Then hands the heap pages freed by quantizing back to the OS. Returns the bytes copied."""
    import torch

    from peftune.merge.writer import release_freed_memory

    copies: dict[tuple, torch.Tensor] = {}  # one copy per distinct view (ties survive)
    copied = 0

    def owned(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal copied
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key not in copies:
            copies[key] = tensor.detach().clone()
            copied += tensor.numel() * tensor.element_size()
        return copies[key]

    def plain(tensor: Any) -> bool:
        return (type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.device.type == "cpu"
                and tensor.is_floating_point() and tensor.numel() > 0)

    seen: set[int] = set()
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in seen and plain(param):
                seen.add(id(param))
                param.data = owned(param.data)  # the same Parameter: ties and optimizers hold
        for name, buffer in module._buffers.items():
            if buffer is not None and plain(buffer):
                module._buffers[name] = owned(buffer)
    copies.clear()
    release_freed_memory()
    return copied
