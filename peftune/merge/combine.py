"""Multi-adapter merge methods, computed exactly on each module's task vectors ΔW_i = B_i·A_i
(never on A and B separately), in fp32. Each function combines the deltas of ONE module.

Conventions (docs/merging.md has the table against mergekit and peft):
- `weights` w_i multiply each ΔW_i; `lam` (λ) scales the result (default 1).
- trim scope: per module and per adapter (the top-`density` fraction of |ΔW_i| of that
  tensor is kept); ties on the threshold are broken by position (torch.topk).
- TIES (Yadav et al. 2023, "TIES-Merging"): sign per entry = sign(Σ_i w_i·t_i) (weighted
  vote); the merged entry is Σ_i w_i·t_i·[agree] / Σ_i w_i·[agree and t_i ≠ 0] (disjoint
  mean, mergekit's divisor); entries no adapter keeps are 0.
- DARE (Yu et al. 2024, "Language Models are Super Mario"): each entry dropped with
  p = 1 − density (Bernoulli, one torch.Generator per (seed, adapter, module)), survivors
  × 1/density. DAREx-q: survivors × 1/q instead (q given).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Inputs:
    """The deltas of one module and everything the methods read."""

    deltas: list[torch.Tensor]
    weights: list[float]
    densities: list[float]
    lam: float = 1.0
    q: float | None = None
    generators: list[torch.Generator] | None = None


def _weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0])
    for tensor, weight in zip(tensors, weights, strict=True):
        out += weight * tensor
    return out


def linear(x: Inputs) -> torch.Tensor:
    return _weighted_sum(x.deltas, x.weights)


def task_arithmetic(x: Inputs) -> torch.Tensor:
    return x.lam * _weighted_sum(x.deltas, x.weights)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """True on the top-`density` fraction of |delta| (at least one entry when density > 0)."""
    k = max(1, round(density * delta.numel()))
    if k >= delta.numel():
        return torch.ones_like(delta, dtype=torch.bool)
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[torch.topk(delta.abs().flatten(), k, sorted=False).indices] = True
    return keep.view_as(delta)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    return delta * magnitude_mask(delta, density)


def magnitude_prune(x: Inputs) -> torch.Tensor:
    return x.lam * _weighted_sum([trim(d, p) for d, p in zip(x.deltas, x.densities, strict=True)], x.weights)


def disjoint_merge(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES' elect + disjoint mean over already trimmed (or dropped) tensors."""
    stacked = torch.stack(tensors)
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * tensors[0].dim())
    weighted = stacked * w
    sign = torch.sign(weighted.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    divisor = (w * agree).sum(0)
    total = (weighted * agree).sum(0)
    return torch.where(divisor != 0, total / divisor.where(divisor != 0, torch.ones_like(divisor)),
                       torch.zeros_like(total))


def ties(x: Inputs) -> torch.Tensor:
    trimmed = [trim(d, p) for d, p in zip(x.deltas, x.densities, strict=True)]
    return x.lam * disjoint_merge(trimmed, x.weights)


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator,
              rescale: float) -> torch.Tensor:
    """Keep each entry with probability `density`, multiply survivors by `rescale`."""
    if density >= 1.0:
        return delta * rescale
    keep = torch.rand(delta.shape, generator=generator) < density
    return delta * keep * rescale


def _dropped(x: Inputs, *, q: float | None = None) -> list[torch.Tensor]:
    assert x.generators is not None  # the runner always gives one per adapter
    return [dare_drop(d, p, g, 1.0 / (q if q is not None else p))
            for d, p, g in zip(x.deltas, x.densities, x.generators, strict=True)]


def dare_linear(x: Inputs) -> torch.Tensor:
    return x.lam * _weighted_sum(_dropped(x), x.weights)


def dare_ties(x: Inputs) -> torch.Tensor:
    return x.lam * disjoint_merge(_dropped(x), x.weights)


def darex_q(x: Inputs) -> torch.Tensor:
    return x.lam * _weighted_sum(_dropped(x, q=x.q), x.weights)


def refactor_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ΔW ≈ B·A with B = U_r·√S_r, A = √S_r·V_rᵀ (Eckart-Young: the best rank-r approximation);
    the Frobenius error ‖ΔW − B·A‖ equals the norm of the discarded singular values."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b_mat = (u[:, :r] * root).float()
    a_mat = (root[:, None] * vh[:r]).float()
    error = float(s[r:].pow(2).sum().sqrt())
    return b_mat, a_mat, error
