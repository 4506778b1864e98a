"""MoLA's mixture layer, `apply_mola`, and its native adapter directory (formula and paper:
`configs.py`).

Every expert of a layer is computed for every token, as one pair of matmuls of rank E·r
(the experts' A stacked, then their B side by side), with the gates zero outside each
token's top k: exact, and at the small E·r of LoRA experts cheaper than gathering tokens
per expert. The export is `peftune_adapter.json` (the settings and each module's expert
count) and `peftune_adapter.safetensors` (each module's router, A and B), which
`load_mola` rebuilds on the plain base (`peftune.adapters.native.load_native_adapter`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from peftune.adapters.common import decoder_layers
from peftune.adapters.hooks import AdapterHooks
from peftune.adapters.mola.configs import MolaConfig
from peftune.adapters.native import NATIVE_CONFIG, NATIVE_WEIGHTS, read_native_config
from peftune.adapters.targets import peft_targets, targeted_layers
from peftune.errors import InputError


class MolaLinear(nn.Module):
    """y = base(x) + s·Σ_e g_e(x)·B_e·A_e·x over E experts, gates from a top-k router."""

    def __init__(self, base: nn.Module, *, experts: int, rank: int, top_k: int,
                 scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.experts, self.rank, self.scaling = experts, rank, scaling
        self.top_k = min(top_k, experts)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = next(base.parameters()).device
        self.lora_A = nn.Parameter(torch.zeros(experts, rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(experts, self.out_features, rank, device=device))
        self.router = nn.Parameter(torch.zeros(experts, self.in_features, device=device))
        self.balance: torch.Tensor | None = None  # the last forward's load-balancing term

    def reset(self) -> None:
        """A_e and the router as nn.Linear initialises a weight; B_e zero (ΔW = 0)."""
        with torch.no_grad():
            for expert in range(self.experts):
                nn.init.kaiming_uniform_(self.lora_A[expert], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))
            self.lora_B.zero_()

    def gates(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gates, router probabilities), both (..., E); gates are the top-k probabilities
        renormalised, zero elsewhere."""
        probs = F.linear(h, self.router).softmax(dim=-1)
        if self.top_k == self.experts:
            return probs, probs
        top, index = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True))
        return gates, probs

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        h = self.dropout(x).to(torch.float32)
        gates, probs = self.gates(h)
        z = F.linear(h, self.lora_A.reshape(-1, self.in_features))  # (..., E·r)
        z = (z.unflatten(-1, (self.experts, self.rank)) * gates.unsqueeze(-1)).flatten(-2)
        stacked_b = self.lora_B.permute(1, 0, 2).reshape(self.out_features, -1)  # out x E·r
        delta = F.linear(z, stacked_b) * self.scaling
        if self.training:
            routed = (gates > 0).to(probs.dtype).reshape(-1, self.experts).mean(0) / self.top_k
            self.balance = self.experts * (routed * probs.reshape(-1, self.experts).mean(0)).sum()
        return out + delta.to(out.dtype)


def mola_layers(model: nn.Module) -> dict[str, MolaLinear]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, MolaLinear)}


def attach(model: nn.Module, config: MolaConfig,
           counts: dict[str, int] | None = None) -> dict[str, MolaLinear]:
    """Wrap the targeted layers; `counts` (module name -> experts, from an export) or the
    config's schedule over the model's decoder layers."""
    if counts is None:
        counts = expert_counts(model, config)
    for name, experts in counts.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MolaLinear(getattr(parent, child), experts=experts,
                                          rank=config.r, top_k=config.top_k,
                                          scaling=config.scaling(), dropout=config.dropout))
    return mola_layers(model)


def expert_counts(model: nn.Module, config: MolaConfig) -> dict[str, int]:
    """module name -> E_l of its decoder layer; refuses a list of the wrong length and a
    target outside the decoder layers."""
    blocks = decoder_layers(model)
    if isinstance(config.experts, list) and len(config.experts) != len(blocks):
        raise InputError(f"adapter.experts: a list of {len(config.experts)} counts for a model "
                         f"of {len(blocks)} decoder layers; give one count per layer, or a "
                         "number with adapter.schedule: increasing | uniform")
    per_layer = config.experts_per_layer(len(blocks))
    index_of = {id(module): i for i, block in enumerate(blocks) for module in block.modules()}
    counts = {}
    for name in targeted_layers(model, config.target_modules):
        index = index_of.get(id(model.get_submodule(name)))
        if index is None:
            raise InputError(f"adapter.target_modules: {name} is not in a decoder layer, so "
                             "MoLA's per-layer expert schedule has no count for it; target "
                             "modules of the decoder layers")
        counts[name] = per_layer[index]
    return counts


def apply_mola(model: Any, config: MolaConfig, **_: Any) -> tuple[Any, AdapterHooks]:
    """Freeze the base, wrap the targeted layers with their experts; the hooks add the
    load-balancing loss (when asked) and export the native adapter."""
    peft_targets(model, config)  # a target that matches nothing, a rank too large
    for param in model.parameters():
        param.requires_grad_(False)
    layers = attach(model, config)
    for layer in layers.values():
        layer.reset()
    counts = sorted({layer.experts for layer in layers.values()})
    hooks = AdapterHooks(
        export=lambda m, out_dir, tokenizer=None: export_mola(m, out_dir, tokenizer,
                                                              config=config),
        trainable_state=_state, load_trainable_state=_load_state,
        init_report={"experts_per_layer": "-".join(map(str, _per_block(model, layers))),
                     "experts_range": f"{counts[0]}..{counts[-1]}"})
    if config.router_aux_loss > 0:
        def balance(m: Any) -> Any:
            terms = [layer.balance for layer in layers.values() if layer.balance is not None]
            return config.router_aux_loss * torch.stack(terms).mean() if terms else None

        hooks.extra_loss = balance
    return model, hooks


def _per_block(model: nn.Module, layers: dict[str, MolaLinear]) -> list[int]:
    """The experts of each decoder layer's modules (the run header shows the schedule)."""
    blocks = decoder_layers(model)
    return [max((m.experts for m in block.modules() if isinstance(m, MolaLinear)), default=0)
            for block in blocks]


def _state(model: Any) -> dict:
    return {f"{name}.{key}": tensor.detach().to("cpu", copy=True).contiguous()
            for name, layer in mola_layers(model).items()
            for key, tensor in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B),
                                ("router", layer.router))}


def _load_state(model: Any, state: dict) -> None:
    expected = _state(model)
    if expected.keys() != state.keys():
        missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, layer in mola_layers(model).items():
            for key in ("lora_A", "lora_B", "router"):
                getattr(layer, key).copy_(state[f"{name}.{key}"])


def export_mola(model: Any, out_dir: str | Path, tokenizer: Any = None, *,
                config: MolaConfig) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_state(model), str(out / NATIVE_WEIGHTS), metadata={"format": "pt"})
    described = {
        "format": "peftune-native-adapter", "version": 1, "method": config.method,
        "settings": config.model_dump(mode="json"),
        "base_model_name_or_path": model.config.name_or_path or None,
        "layout": {"experts": {name: layer.experts for name, layer in mola_layers(model).items()}},
        "load_with": "peftune.adapters.native.load_native_adapter(model, adapter_dir)",
    }
    (out / NATIVE_CONFIG).write_text(json.dumps(described, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def load_mola(model: Any, adapter_dir: str | Path, *, trainable: bool = False) -> Any:
    """Rebuild an exported MoLA adapter on `model` (the plain base it was trained on)."""
    from safetensors.torch import load_file

    described = read_native_config(adapter_dir)
    config = MolaConfig.model_validate(described["settings"])
    counts = described["layout"]["experts"]
    missing = [name for name in counts if not _has_module(model, name)]
    if missing:
        raise InputError(f"{adapter_dir}: the adapter was trained on a model with module "
                         f"{missing[0]} ({described.get('base_model_name_or_path')}); this "
                         "model has none")
    layers = attach(model, config, counts)
    device = next(iter(layers.values())).lora_A.device
    state = load_file(str(Path(adapter_dir) / NATIVE_WEIGHTS), device=str(device))
    try:
        _load_state(model, state)
    except (ValueError, RuntimeError) as err:
        raise InputError(f"{adapter_dir}: the weights do not fit this model: "
                         f"{str(err).splitlines()[0]}") from None
    for layer in layers.values():
        for param in (layer.lora_A, layer.lora_B, layer.router):
            param.requires_grad_(trainable)
    return model


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
