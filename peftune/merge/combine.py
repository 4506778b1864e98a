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
- PCB (Du et al. 2024, "Parameter Competition Balancing for Model Merging"), per module over
  the N task vectors τ_i = w_i·ΔW_i, with Norm(x) = (x − min x)/(max x − min x) over the tensor
  (0 for a constant tensor) and Softmax over the tensor's entries:
  intra_i = Softmax(N·Norm(τ_i ⊙ τ_i)); inter_i = Σ_j Softmax(Norm(τ_i ⊙ τ_j));
  β_i = intra_i ⊙ inter_i; entries of β_i below its top-`density` fraction are set to 0
  (the paper's drop ratio r = 1 − density); merged = λ·Σ_i β_i ⊙ τ_i / Σ_i β_i (0 where Σ β_i = 0).
- LoRA-LEGO (Zhao et al. 2024, "Merging LoRAs like Playing LEGO"): not on ΔW but on its rank-1
  units, necessarily: every rank j of every adapter is a unit u = [b_j; a_j] with
  ΔW_i = Σ_j b_j a_jᵀ (adapter scale and weight folded in as √|w·s| on both, the sign on b;
  the sign pair (b, a) ~ (−b, −a) made canonical: a's largest-magnitude entry positive).
  Seeded k-means (k-means++ start, Lloyd steps until no unit moves) clusters them into k;
  dual reweighting: each centroid is rescaled to the mean norm of its members (a mean of
  unit vectors is shorter than they are), and the merged ΔW = Σ_k b_k a_kᵀ is rescaled so that
  ‖ΔW‖_F equals ‖Σ_i w_i ΔW_i‖_F (the linear merge's); then × λ.
"""

from __future__ import annotations

import math
import zlib
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
    factors: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None  # (B, A): ΔW_i = B·A
    k: int | None = None
    t: float | None = None  # slerp
    generator: torch.Generator | None = None  # one per module (k-means)


def seed_for(seed: int, adapter: int, name: str) -> int:
    """DARE's mask seed for one adapter's module: independent of module order and shards."""
    return (seed * 1_000_003 + adapter * 7_919 + zlib.crc32(name.encode())) % (2**63)


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


def _minmax(x: torch.Tensor) -> torch.Tensor:
    low, high = x.min(), x.max()
    return (x - low) / (high - low) if high > low else torch.zeros_like(x)


def _softmax_all(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.flatten(), 0).view_as(x)


def pcb_scores(tasks: list[torch.Tensor], density: list[float]) -> list[torch.Tensor]:
    """PCB's balanced, dropped importance β_i of each task vector (fp64)."""
    n = len(tasks)
    scores = []
    for i, t in enumerate(tasks):
        intra = _softmax_all(n * _minmax(t * t))
        inter = sum(_softmax_all(_minmax(t * other)) for other in tasks)
        scores.append((intra * inter) * magnitude_mask(intra * inter, density[i]))
    return scores


def pcb(x: Inputs) -> torch.Tensor:
    tasks = [w * d.double() for d, w in zip(x.deltas, x.weights, strict=True)]
    scores = pcb_scores(tasks, x.densities)
    total = sum(scores)
    merged = sum(b * t for b, t in zip(scores, tasks, strict=True))
    out = torch.where(total > 0, merged / total.where(total > 0, torch.ones_like(total)),
                      torch.zeros_like(merged))
    return (x.lam * out).to(x.deltas[0].dtype)


def lego_units(factors: list[tuple[torch.Tensor, torch.Tensor] | None],
               weights: list[float]) -> tuple[torch.Tensor, int]:
    """Every rank-1 unit [b_j; a_j] of every adapter as a row (fp64), and len(b)."""
    rows, out_dim = [], None
    for pair, weight in zip(factors, weights, strict=True):
        if pair is None:
            continue
        b_mat, a_mat = pair[0].double(), pair[1].double()
        out_dim = b_mat.shape[0]
        root = abs(weight) ** 0.5
        b_mat = b_mat * (root if weight >= 0 else -root)
        a_mat = a_mat * root
        lead = a_mat.gather(1, a_mat.abs().argmax(1, keepdim=True)).sign()
        lead[lead == 0] = 1
        rows.append(torch.cat([b_mat.T * lead, a_mat * lead], dim=1))
    assert out_dim is not None  # the runner only asks for modules some adapter changes
    return torch.cat(rows), out_dim


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator,
           iterations: int = 100) -> torch.Tensor:
    """Cluster index of each row: k-means++ start from `generator`, Lloyd steps until stable."""
    n = points.shape[0]
    centers = [points[int(torch.randint(n, (1,), generator=generator))]]
    for _ in range(1, k):
        dist = torch.cdist(points, torch.stack(centers)).min(1).values.pow(2)
        if float(dist.sum()) == 0:
            pick = int(torch.randint(n, (1,), generator=generator))
        else:
            pick = int(torch.multinomial(dist / dist.sum(), 1, generator=generator))
        centers.append(points[pick])
    center = torch.stack(centers)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        new = torch.cdist(points, center).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = labels == c
            if members.any():
                center[c] = points[members].mean(0)
            else:  # an empty cluster takes the point farthest from its center
                far = int(torch.cdist(points, center).min(1).values.argmax())
                center[c] = points[far]
    return labels


def lora_lego(x: Inputs) -> torch.Tensor:
    assert x.factors is not None and x.k is not None and x.generator is not None
    units, out_dim = lego_units(x.factors, x.weights)
    if x.k > units.shape[0]:
        raise ValueError(f"k = {x.k} is more than the {units.shape[0]} rank units")
    labels = kmeans(units, x.k, x.generator)
    norms = units.norm(dim=1)
    merged = torch.zeros(out_dim, units.shape[1] - out_dim, dtype=torch.float64)
    for c in range(x.k):
        members = labels == c
        if not members.any():
            continue
        center = units[members].mean(0)
        length = float(center.norm())
        if length > 0:  # parameter reweighting: the members' mean norm
            center = center * (float(norms[members].mean()) / length)
        merged += torch.outer(center[:out_dim], center[out_dim:])
    reference = float(_weighted_sum([d.double() for d in x.deltas], x.weights).norm())
    size = float(merged.norm())
    if size > 0:  # output reweighting: the linear merge's Frobenius norm
        merged *= reference / size
    return (x.lam * merged).to(x.deltas[0].dtype)


SLERP_PARALLEL = 1 - 1e-6  # |cos ω| above this: the tensors are parallel, interpolate linearly


def slerp_tensors(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (Shoemake 1985), each flattened:
    sin((1−t)ω)/sin ω · a + sin(tω)/sin ω · b with cos ω = ⟨a, b⟩/(‖a‖‖b‖); linear
    (1−t)·a + t·b when |cos ω| > SLERP_PARALLEL or either is zero (fp64)."""
    x, y = a.double().flatten(), b.double().flatten()
    na, nb = float(x.norm()), float(y.norm())
    cos = float(x @ y) / (na * nb) if na > 0 and nb > 0 else 1.0
    if abs(cos) > SLERP_PARALLEL:
        out = (1 - t) * x + t * y
    else:
        omega = math.acos(max(-1.0, min(1.0, cos)))
        out = (math.sin((1 - t) * omega) * x + math.sin(t * omega) * y) / math.sin(omega)
    return out.view_as(a).to(a.dtype)


def slerp(x: Inputs) -> torch.Tensor:
    """On the two models' weights (not task vectors): `deltas` holds θ_1, θ_2 here."""
    assert x.t is not None
    return slerp_tensors(x.deltas[0], x.deltas[1], x.t)


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
