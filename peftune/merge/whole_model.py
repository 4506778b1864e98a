"""Merges and checks that load whole models (through transformers and peft) rather than
stream tensor by tensor: the fp32 base (dequantized into plain linears when the checkpoint
holds only bitsandbytes weights), peft's own `merge_and_unload` for the methods that are not
plain LoRA (DoRA, LoHa, LoKr, VeRA, OFT, IA3, ...), and the probe logits of whole models for
the verification of those merges (`peftune.merge.verify`).

transformers and peft are imported inside the functions that load models: they are heavy,
and a streaming merge imports transformers in a background thread while it works
(`adapter_merge`), which an import at the top of this module would serialise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from peftune import compat
from peftune.errors import InputError
from peftune.merge.verify import probe_inputs, probe_logits
from peftune.merge.writer import (
    DTYPES,
    MergeStats,
    ShardWriter,
    base_tensor_shapes,
    copy_model_files,
)
from peftune.models import load_model, load_tokenizer, quiet_libraries
from peftune.recipe.schema import ModelSection, QuantSection


def load_base(base: Path, *, dequantize: bool, trust_remote_code: bool = False) -> Any:
    """The base in fp32 on CPU; a quantized checkpoint dequantized into plain nn.Linear.
    `trust_remote_code`: the recipe's model.trust_remote_code (off by default), on both paths."""
    if not dequantize:
        return load_model(ModelSection(path=str(base), dtype="float32",
                                       trust_remote_code=trust_remote_code), QuantSection(),
                          device=torch.device("cpu"))
    quiet_libraries()  # before bitsandbytes is imported: no loading bars or kernel notices
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, device_map={"": "cpu"}, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    for name, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        if weight is not None and type(weight).__name__ in ("Params4bit", "Int8Params"):
            compat.disable_bnb_cpu_bf16_repacking(module)
            plain = torch.nn.Linear(module.in_features, module.out_features,
                                    bias=module.bias is not None)
            plain.weight.data = compat.dequantize_bnb(weight, state=getattr(module, "state", None)).float()
            if module.bias is not None:
                plain.bias.data = module.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.is_quantized = False  # before .float(), which transformers refuses on a quantized model
    model.float()
    return model


def attach_adapter(model: Any, base: Path, adapter: Path) -> Any:
    """The adapter on `model`: by peft, or by its method's loader for a native adapter
    (which gives the model peft's `merge_and_unload` and `get_base_model`)."""
    from peft import PeftModel

    from peftune.adapters.native import is_native_adapter, load_native_adapter

    try:
        if is_native_adapter(adapter):
            return load_native_adapter(model, adapter)
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        lines = str(err).strip().splitlines()
        detail = next((line.strip() for line in lines if "size mismatch" in line),
                      lines[0] if lines else type(err).__name__)
        raise InputError(f"--adapter {adapter} does not match the base {base}: {detail[:200]}; "
                         "merge it into the base it was trained on") from None


def merge_in_memory(base: Path, adapter: Path, tmp: Path, *, dtype: str, shard_bytes: int,
               dequantize: bool, trust_remote_code: bool = False):
    """peft's own merge (exact for the method) on the fp32 base, then the same writer."""
    peft_model = attach_adapter(load_base(base, dequantize=dequantize,
                                    trust_remote_code=trust_remote_code), base, adapter)
    before = {n.replace(".base_layer.", "."): p.detach().clone()
              for n, p in peft_model.get_base_model().state_dict().items()}
    merged = peft_model.merge_and_unload()
    state = merged.state_dict()
    stats, writer = MergeStats(), ShardWriter(tmp, shard_bytes)
    names = list(checkpoint_names(base)) if not dequantize else list(state)
    for name in names:
        key = name if name in state else next((k for k in state if k.endswith(name)), None)
        if key is None:
            continue
        tensor = state[key]
        old = before.get(key)
        if old is not None and old.shape == tensor.shape and not torch.equal(old, tensor):
            stats.add(name, old.float(), tensor.float() - old.float())
        target = DTYPES.get(dtype, tensor.dtype) if tensor.is_floating_point() else tensor.dtype
        writer.add(name, tensor.to(target))
    files = writer.close()
    copy_model_files(base, tmp, dtype=dtype if dtype in DTYPES else
                     ("float32" if dequantize else None), tokenizer_from=adapter)
    from peftune.adapters.native import is_native_adapter

    kind = "native" if is_native_adapter(adapter) else "peft"  # native: the sparse methods
    return stats, files, f"{kind} merge_and_unload (fp32)"


def checkpoint_names(base: Path):
    return base_tensor_shapes(base).keys()


def reference_logits(base: Path, adapter: Path | None, *, dequantize: bool,
                      trust_remote_code: bool = False):
    """Logits of base + adapter (unmerged, through peft) and of the base, in fp32."""
    inputs = probe_inputs(load_tokenizer(str(base)))
    model = load_base(base, dequantize=dequantize, trust_remote_code=trust_remote_code)
    base_logits = probe_logits(model, inputs)
    if adapter is None:
        return base_logits, None
    model = attach_adapter(model, base, adapter)
    reference = probe_logits(model, inputs)
    del model
    return reference, base_logits


def merged_logits(tmp: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, use_safetensors=True)
    return probe_logits(model, probe_inputs(load_tokenizer(str(tmp))))
