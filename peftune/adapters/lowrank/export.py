"""Writing a native low-rank adapter as a plain PEFT LoRA, and its resumable state.

The export is a standard PEFT adapter directory (`adapter_config.json` +
`adapter_model.safetensors`) that `peft.PeftModel.from_pretrained` loads on the original
base: per module, B' and A' from `LowRankLinear.export_factors` (scaling folded into B', so
each module's alpha equals its rank), with per-module ranks in `rank_pattern`. A module
whose every rank was pruned is left out.

A checkpoint holds every factor of every layer, frozen ones included (LaMDA freezes B
mid-run), with which factors train, the masks and importance averages, the sampled rank
and the hooks' step: what `--resume` needs to continue exactly. NOLA's bases are not
stored; they are regenerated from the seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from peftune.adapters.lowrank.layer import LowRankLinear, lowrank_layers

_BUFFERS = ("lora_mask", "importance")


def export_lowrank(model: Any, out_dir: Path, tokenizer: Any = None) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    was_training = model.training
    model.eval()  # the rank evaluated is the rank exported (DyLoRA's export_rank)
    tensors, ranks = {}, {}
    try:
        for name, layer in lowrank_layers(model).items():
            b_mat, a_mat = layer.export_factors()
            if a_mat.shape[0] == 0:
                continue
            tensors[f"base_model.model.{name}.lora_A.weight"] = a_mat
            tensors[f"base_model.model.{name}.lora_B.weight"] = b_mat
            ranks[name] = int(a_mat.shape[0])
    finally:
        model.train(was_training)
    if not ranks:
        from peftune.errors import TrainingError

        raise TrainingError("every rank of the adapter was pruned, so it changes nothing and "
                            "no adapter was written; lower adapter.sparsity (or train.lr)")
    top = max(ranks.values())
    config = LoraConfig(r=top, lora_alpha=top, target_modules=sorted(ranks),
                        rank_pattern=dict(ranks), alpha_pattern=dict(ranks),
                        task_type="CAUSAL_LM",
                        base_model_name_or_path=model.config.name_or_path or None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def _tensors(layer: LowRankLinear) -> dict[str, torch.Tensor]:
    found = {name: param for name, param in layer.named_parameters(remove_duplicate=False)
             if not name.startswith("base_layer.")}
    found.update({name: getattr(layer, name) for name in _BUFFERS if hasattr(layer, name)})
    # a method's own running state (IncreLoRA's importance averages)
    found.update({name: getattr(layer, name) for name in getattr(layer, "state_buffers", ())})
    return found


def lowrank_state(model: Any, hook_state: dict) -> dict:
    state = {"hooks.step": torch.tensor(hook_state["step"])}
    for name, layer in lowrank_layers(model).items():
        for key, tensor in _tensors(layer).items():
            state[f"{name}.{key}"] = tensor.detach().to("cpu", copy=True).contiguous()
            if isinstance(tensor, torch.nn.Parameter):
                state[f"{name}.{key}.trains"] = torch.tensor(tensor.requires_grad)
        state[f"{name}.rank_limit"] = torch.tensor(-1 if layer.rank_limit is None else layer.rank_limit)
    return state


def load_lowrank_state(model: Any, state: dict, hook_state: dict) -> None:
    expected = set(lowrank_state(model, hook_state))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    hook_state["step"] = int(state["hooks.step"])
    with torch.no_grad():
        for name, layer in lowrank_layers(model).items():
            for key, tensor in _tensors(layer).items():
                tensor.copy_(state[f"{name}.{key}"])
                if isinstance(tensor, torch.nn.Parameter):
                    tensor.requires_grad_(bool(state[f"{name}.{key}.trains"]))
            limit = int(state[f"{name}.rank_limit"])
            layer.rank_limit = None if limit < 0 else limit
            layer.masked = bool((layer.lora_mask < 1).any())
