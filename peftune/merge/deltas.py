"""A PEFT LoRA adapter directory read as per-module weight deltas, exactly as peft applies
it: ΔW = scale·B·A with scale = alpha/r (alpha/√r under rsLoRA), per-module r and alpha from
`rank_pattern` / `alpha_pattern`, transposed for `fan_in_fan_out` layers, embeddings'
ΔE = scale·(B·A)ᵀ, plus whole tensors that `modules_to_save` replaces.

Only plain LoRA (no DoRA) is read here; other methods merge through peft (`whole_model`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from peftune import compat
from peftune.errors import InputError

_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                   r"(?:\.default)?(?:\.weight)?$")


@dataclass
class LoraAdapter:
    """A plain LoRA adapter: its factors per module, and whole replaced tensors."""

    path: Path
    config: dict
    factors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> A/B
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # base tensor name -> value

    def scale(self, module: str) -> float:
        rank_pattern = self.config.get("rank_pattern") or {}
        alpha_pattern = self.config.get("alpha_pattern") or {}
        r, alpha = self.config["r"], self.config["lora_alpha"]
        if rank_pattern or alpha_pattern:  # peft's own matching rule; peft is imported only
            # here: it is slow to import, and a streaming merge imports transformers (which
            # peft needs) in a thread meanwhile
            r = rank_pattern.get(compat.pattern_key(rank_pattern.keys(), module), r)
            alpha = alpha_pattern.get(compat.pattern_key(alpha_pattern.keys(), module), alpha)
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def weight_name(self, module: str) -> str:
        return f"{module}.weight"

    def delta(self, module: str) -> torch.Tensor:
        """ΔW of `module` in fp32, shaped like the base weight."""
        f = self.factors[module]
        s = self.scale(module)
        if "lora_embedding_A" in f:  # A: (r, num_embeddings), B: (dim, r)
            return (f["lora_embedding_B"].float() @ f["lora_embedding_A"].float()).mul_(s).T
        delta = (f["lora_B"].float() @ f["lora_A"].float()).mul_(s)  # s·(B·A), as peft: in place
        return delta.T if self.config.get("fan_in_fan_out") else delta

    def units(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A') in fp32 with ΔW = B'·A' shaped like the base weight (scale folded into B'):
        the rank-1 units b_j a_jᵀ that LoRA-LEGO clusters."""
        f = self.factors[module]
        s = self.scale(module)
        if "lora_embedding_A" in f:  # ΔE = s·(B·A)ᵀ = Aᵀ·(s·Bᵀ)
            return f["lora_embedding_A"].float().T, s * f["lora_embedding_B"].float().T
        b_mat, a_mat = s * f["lora_B"].float(), f["lora_A"].float()
        return (a_mat.T, b_mat.T) if self.config.get("fan_in_fan_out") else (b_mat, a_mat)

    def deltas(self) -> dict[str, torch.Tensor]:
        """Base tensor name -> ΔW, for every module."""
        return {self.weight_name(m): self.delta(m) for m in self.factors}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Base tensor name -> the shape its delta has (without computing it)."""
        out = {}
        for module, f in self.factors.items():
            if "lora_embedding_A" in f:
                shape = (f["lora_embedding_A"].shape[1], f["lora_embedding_B"].shape[0])
            else:
                shape = (f["lora_B"].shape[0], f["lora_A"].shape[1])
                shape = shape[::-1] if self.config.get("fan_in_fan_out") else shape
            out[self.weight_name(module)] = tuple(shape)
        return out


def lazy_deltas(lora: LoraAdapter) -> Callable[[str], torch.Tensor | None]:
    """Base tensor name -> its ΔW computed when asked, None for a tensor the adapter leaves
    alone (the streaming writer's `delta_of`: one module's delta in memory at a time)."""
    modules = {lora.weight_name(m): m for m in lora.factors}

    def delta_of(name: str) -> torch.Tensor | None:
        module = modules.get(name)
        return None if module is None else lora.delta(module)

    return delta_of


def read_adapter_config(path: Path) -> dict:
    try:
        return json.loads((path / "adapter_config.json").read_text())
    except FileNotFoundError:
        raise InputError(f"--adapter {path}: no adapter_config.json, so not a PEFT adapter "
                         "directory; point it at a run's adapter/") from None
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}/adapter_config.json: cannot read it: {err}") from None


def is_plain_lora(config: dict) -> bool:
    return (config.get("peft_type") == "LORA" and not config.get("use_dora")
            and config.get("lora_bias") in (None, False)
            and not config.get("trainable_token_indices"))


def load_lora_adapter(path: Path) -> LoraAdapter:
    """Read a plain LoRA adapter's tensors; one InputError line when its files are missing."""
    config = read_adapter_config(path)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise InputError(f"--adapter {path}: no adapter_model.safetensors (the adapter's "
                         "weights); point it at a complete PEFT adapter directory")
    adapter = LoraAdapter(path=path, config=config)
    for key, tensor in load_file(str(weights)).items():
        name = key.removeprefix(_PREFIX)
        match = _LORA.match(name)
        if match:
            adapter.factors.setdefault(match["module"], {})[match["kind"]] = tensor
        elif ".base_layer." in name:  # the frozen base weight peft saves beside an adapted
            continue                  # lm_head / embedding: the base's own tensor, unchanged
        else:  # modules_to_save: the trained copy of a whole module's tensor
            adapter.replaced[name.replace(".modules_to_save.default", "")] = tensor
    broken = [m for m, f in adapter.factors.items()
              if not ({"lora_A", "lora_B"} <= set(f) or
                      {"lora_embedding_A", "lora_embedding_B"} <= set(f))]
    if broken:
        raise InputError(f"--adapter {path}: module {broken[0]} has only one of its two LoRA "
                         "factors; the adapter file is incomplete")
    return adapter
