"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751; the parallel form of He et
al. 2022, arXiv:2110.04366; LLM-Adapters, Hu et al. 2023) and Compacter (Mahabadi et al.
2021, arXiv:2106.04647) on the sub-blocks of a decoder's layers.

For a sub-block f (attention or MLP) and a(z) = scaling·up(σ(down(z))):
series y = f(x) + a(f(x)); parallel y = f(x) + a(x). `bottleneck` has plain linear
projections; `compacter` has PHM projections W = Σ_i A_i ⊗ (s_i·t_iᵀ) with the A_i
shared by every projection (formulas and inits: `configs.py`).

Supported architectures: decoders whose layers are the model's longest `nn.ModuleList`
and whose sub-blocks are children named `self_attn` (Llama, Mistral, Qwen2, Qwen3, and
others laid out the same way) or `attn` (GPT-2's `transformer.h` blocks), and `mlp`;
tested on Llama, Qwen2 and GPT-2. Any other layout is refused with the names found.

The base is untouched: the adapters live in one module, `model.bottleneck_adapters`
(so they are in `model.parameters()`, move with the model and train), and reach the
sub-blocks through forward hooks; the base's own parameters keep their names. The export
is a native adapter directory (`peftune_adapter.json`: method, settings, layout;
`peftune_adapter.safetensors`: the adapter set's state dict), which `load_bottleneck`
rebuilds on a plain transformers model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from peftune.adapters.bottleneck.configs import (
    NATIVE_CONFIG,
    NATIVE_WEIGHTS,
    BottleneckConfig,
    read_native_config,
)
from peftune.adapters.common import load_trainable_state, trainable_state
from peftune.adapters.hooks import AdapterHooks
from peftune.errors import InputError

ATTRIBUTE = "bottleneck_adapters"  # where the adapter set hangs on the model
SUB_BLOCK_NAMES = {"attn": ("self_attn", "attn"), "mlp": ("mlp",)}
SUPPORTED = ("Llama, Mistral, Qwen2, Qwen3 (self_attn, mlp in model.layers) and GPT-2 "
             "(attn, mlp in transformer.h)")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def phm_weight(rule: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Σ_i A_i ⊗ (s_i·t_iᵀ) for A = rule (n, n, n), s (n, P), t (n, Q): an (n·P) x (n·Q)
    matrix, entry [(a, p), (b, q)] = Σ_i A_i[a, b]·s_i[p]·t_i[q]."""
    n = rule.shape[1]  # A_i is n x n; rule.shape[0] counts the terms
    return torch.einsum("iab,ip,iq->apbq", rule, s, t).reshape(n * s.shape[1], n * t.shape[1])


class PHMLinear(nn.Module):
    """A linear layer whose weight is a Kronecker sum with rank-one B_i = s_i·t_iᵀ; the
    shared A_i (`rule`) are passed in by the adapter set that owns them."""

    def __init__(self, in_features: int, out_features: int, n: int, *, zero: bool,
                 generator: torch.Generator):
        super().__init__()
        std = in_features ** -0.25  # Var(W) = n · (1/n) · std² · std² = 1 / in
        self.s = nn.Parameter(torch.randn(n, out_features // n, generator=generator) * std)
        t = torch.randn(n, in_features // n, generator=generator) * std
        self.t = nn.Parameter(torch.zeros_like(t) if zero else t)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def weight(self, rule: torch.Tensor) -> torch.Tensor:
        return phm_weight(rule, self.s, self.t)

    def forward(self, z: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.weight(rule), self.bias)


class Adapter(nn.Module):
    """down -> σ -> up, times `scaling`; up starts at zero, so the adapter adds nothing."""

    def __init__(self, hidden: int, size: int, config: BottleneckConfig, *,
                 generator: torch.Generator):
        super().__init__()
        self.activation = ACTIVATIONS[config.nonlinearity]
        self.scaling = config.scaling
        self.kronecker = config.kronecker
        if config.kronecker:
            n = config.phm_dim
            self.down = PHMLinear(hidden, size, n, zero=False, generator=generator)
            self.up = PHMLinear(size, hidden, n, zero=True, generator=generator)
        else:
            self.down, self.up = nn.Linear(hidden, size), nn.Linear(size, hidden)
            # nn.Linear's own init, drawn from the run's seed
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(hidden)
            nn.init.uniform_(self.down.bias, -bound, bound, generator=generator)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, z: torch.Tensor, rule: torch.Tensor | None = None) -> torch.Tensor:
        if self.kronecker:
            return self.scaling * self.up(self.activation(self.down(z, rule)), rule)
        return self.scaling * self.up(self.activation(self.down(z)))


class AdapterSet(nn.Module):
    """Every adapter of the model: `layers[i][sublayer]`, and Compacter's shared A_i."""

    def __init__(self, config: BottleneckConfig, *, hidden: int, num_layers: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        size = config.size_for(hidden)
        if config.kronecker:
            n = config.phm_dim
            self.phm_rule = nn.Parameter(torch.randn(n, n, n, generator=generator) / math.sqrt(n))
        else:
            self.phm_rule = None
        self.layers = nn.ModuleList(
            nn.ModuleDict({sub: Adapter(hidden, size, config, generator=generator)
                           for sub in config.sublayers})
            for _ in range(num_layers))
        self.placement = config.placement
        self.handles: list[Any] = []

    def delta(self, index: int, sublayer: str, z: torch.Tensor) -> torch.Tensor:
        adapter = self.layers[index][sublayer]
        dtype = adapter.up.bias.dtype
        return adapter(z.to(dtype), self.phm_rule).to(z.dtype)


# ---- finding the sub-blocks -------------------------------------------------------------------

def find_sub_blocks(model: nn.Module, sublayers: list[str]) -> tuple[str, list[dict[str, str]]]:
    """The decoder layers' path and, per layer, the name of each chosen sub-block; an
    InputError naming what was found when the layout is not one this supports."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        tops = ", ".join(name for name, _ in model.named_children())
        raise InputError(f"adapter.method: bottleneck adapters found no list of decoder layers "
                         f"in this model (its modules: {tops}); supported: {SUPPORTED}")
    path, blocks = max(lists, key=lambda item: len(item[1]))
    found = []
    for block in blocks:
        children = dict(block.named_children())
        names = {}
        for sub in sublayers:
            name = next((n for n in SUB_BLOCK_NAMES[sub] if n in children), None)
            if name is None:
                raise InputError(
                    f"adapter.sublayers: no {sub} sub-block in {path}.0 "
                    f"({type(blocks[0]).__name__}, modules: {', '.join(children)}); bottleneck "
                    f"adapters support {SUPPORTED}")
            names[sub] = name
        found.append(names)
    return path, found


def _hidden_size(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    return int(config.hidden_size)


def attach(model: nn.Module, config: BottleneckConfig, *, seed: int = 0) -> AdapterSet:
    """Build the adapter set for `model` and hook it into the sub-blocks."""
    if hasattr(model, ATTRIBUTE):
        raise InputError(f"the model already has bottleneck adapters ({ATTRIBUTE}); load the "
                         "adapter onto a fresh base")
    path, found = find_sub_blocks(model, config.sublayers)
    hidden = _hidden_size(model)
    problem = config.size_problem(hidden)
    if problem:
        raise InputError(f"adapter.{problem[0]}: {problem[1]}")
    device = next(model.parameters()).device
    adapters = AdapterSet(config, hidden=hidden, num_layers=len(found), seed=seed).to(device)
    setattr(model, ATTRIBUTE, adapters)
    blocks = model.get_submodule(path)
    for index, names in enumerate(found):
        for sub, name in names.items():
            module = getattr(blocks[index], name)
            adapters.handles.append(module.register_forward_hook(
                _hook(adapters, index, sub), with_kwargs=True))
    adapters.layout = {"blocks": path, "sub_blocks": found[0], "hidden_size": hidden,
                       "bottleneck_size": config.size_for(hidden), "num_layers": len(found)}
    return adapters


def _hook(adapters: AdapterSet, index: int, sublayer: str) -> Any:
    def add_adapter(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        out = output[0] if isinstance(output, tuple) else output
        if adapters.placement == "series":
            z = out
        else:  # the sub-block's input: Llama passes hidden_states by keyword, GPT-2 by position
            z = args[0] if args else kwargs["hidden_states"]
        new = out + adapters.delta(index, sublayer, z).to(out.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return add_adapter


# ---- the method ------------------------------------------------------------------------------

def apply_bottleneck(model: Any, config: BottleneckConfig, *, seed: int = 0,
                     **_: Any) -> tuple[Any, AdapterHooks]:
    """Freeze the base, attach the adapters; the hooks export the native adapter."""
    for param in model.parameters():
        param.requires_grad_(False)
    attach(model, config, seed=seed)
    return model, AdapterHooks(
        export=lambda m, out_dir, tokenizer=None: export_bottleneck(m, out_dir, tokenizer,
                                                                    config=config),
        trainable_state=trainable_state,
        load_trainable_state=load_trainable_state,
    )


def export_bottleneck(model: Any, out_dir: str | Path, tokenizer: Any = None, *,
                      config: BottleneckConfig) -> None:
    """The native adapter directory: settings and layout (JSON) and the weights."""
    from safetensors.torch import save_file

    adapters: AdapterSet = getattr(model, ATTRIBUTE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous()
               for k, v in adapters.state_dict().items()}
    save_file(tensors, str(out / NATIVE_WEIGHTS), metadata={"format": "pt"})
    described = {
        "format": "peftune-native-adapter", "version": 1, "method": config.method,
        "settings": config.model_dump(mode="json"),
        "base_model_name_or_path": model.config.name_or_path or None,
        "layout": adapters.layout,
        "load_with": "peftune.adapters.bottleneck.load_bottleneck(model, adapter_dir)",
    }
    (out / NATIVE_CONFIG).write_text(json.dumps(described, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def load_bottleneck(model: Any, adapter_dir: str | Path, *, trainable: bool = False) -> Any:
    """Rebuild an exported bottleneck / Compacter adapter on `model` (a plain transformers
    model of the base it was trained on) and return the model."""
    from safetensors.torch import load_file

    from peftune.adapters.registry import get_method

    described = read_native_config(adapter_dir)
    if described is None:
        raise InputError(f"{adapter_dir}: no {NATIVE_CONFIG}, so not a bottleneck adapter "
                         "directory (a run's adapter/)")
    method = described.get("method")
    if method not in ("bottleneck", "compacter"):
        raise InputError(f"{adapter_dir}/{NATIVE_CONFIG}: method {method!r} is not a "
                         "bottleneck adapter (bottleneck or compacter)")
    config = get_method(method).config.model_validate(described["settings"])
    adapters = attach(model, config)
    if adapters.layout["num_layers"] != described["layout"]["num_layers"] or \
            adapters.layout["hidden_size"] != described["layout"]["hidden_size"]:
        delattr(model, ATTRIBUTE)
        for handle in adapters.handles:
            handle.remove()
        trained = described["layout"]
        raise InputError(f"{adapter_dir}: the adapter was trained on a base with "
                         f"{trained['num_layers']} layers of hidden size {trained['hidden_size']} "
                         f"({described.get('base_model_name_or_path')}); this model has "
                         f"{adapters.layout['num_layers']} of {adapters.layout['hidden_size']}")
    state = load_file(str(Path(adapter_dir) / NATIVE_WEIGHTS),
                      device=str(next(adapters.parameters()).device))
    adapters.load_state_dict(state, strict=True)
    adapters.requires_grad_(trainable)
    return model
