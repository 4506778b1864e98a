"""The merge-method registry: the name a merge.yaml uses -> the function that combines the
adapters' ΔW of one module, and which keys it reads. Torch-free, so a merge.yaml is
validated before anything heavy is imported; the functions live in `peftune.merge.combine`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class MergeMethod:
    name: str
    combine: str  # "module:function", imported on first use
    description: str
    uses_density: bool = False
    uses_q: bool = False
    uses_t: bool = False  # slerp: two full models, interpolation point t
    uses_k: bool = False  # lora_lego: clusters rank units, so it reads the factors, not ΔW alone

    def load(self):
        module, _, func = self.combine.partition(":")
        return getattr(importlib.import_module(module), func)


_C = "peftune.merge.combine"
MERGE_METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("linear", f"{_C}:linear", "Σ w_i ΔW_i"),
    MergeMethod("task_arithmetic", f"{_C}:task_arithmetic", "λ · Σ w_i ΔW_i (Ilharco et al. 2023)"),
    MergeMethod("magnitude_prune", f"{_C}:magnitude_prune",
                "keep each ΔW_i's top-density magnitudes, then λ · Σ w_i", uses_density=True),
    MergeMethod("ties", f"{_C}:ties", "trim, elect sign, disjoint mean (Yadav et al. 2023)",
                uses_density=True),
    MergeMethod("dare_linear", f"{_C}:dare_linear",
                "drop with p = 1 - density, rescale by 1/density, λ · Σ w_i (Yu et al. 2024)",
                uses_density=True),
    MergeMethod("dare_ties", f"{_C}:dare_ties", "DARE drop and rescale, then TIES sign election",
                uses_density=True),
    MergeMethod("darex_q", f"{_C}:darex_q", "DARE drop, rescale by 1/q instead of 1/(1-p) (DAREx)",
                uses_density=True, uses_q=True),
    MergeMethod("pcb", f"{_C}:pcb", "parameter competition balancing: intra/inter-task "
                "importance, drop the lowest (1 - density), weighted mean (Du et al. 2024)",
                uses_density=True),
    MergeMethod("slerp", f"{_C}:slerp", "spherical interpolation of two full models at t "
                "(per tensor; linear for near-parallel tensors)", uses_t=True),
    MergeMethod("lora_lego", f"{_C}:lora_lego", "rank-1 units of every adapter k-means "
                "clustered into k, dual reweighting (Zhao et al. 2024)", uses_k=True),
)}


def merge_method_names() -> list[str]:
    return sorted(MERGE_METHODS)
