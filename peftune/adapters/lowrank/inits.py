"""Init rules of the native low-rank methods; a config names its rule in `init_rule`. Each
rule, `rule(layers, config, context)`, sets the layers' factors from a random draw (seeded
by the run), W's SVD, LU or Nyström sketch, or a gradient estimated over calibration
batches; `residual` methods then move the initial product out of W (done by the caller).
It returns what the run header reports, if anything.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftune.adapters.lowrank.layer import LowRankLinear
from peftune.errors import InputError

Layers = dict[str, LowRankLinear]


def timed(rule: Callable[[Layers, Any, dict], Any]) -> Callable[[Layers, Any, dict], dict]:
    """A rule whose run time the run header reports (the decompositions of W)."""

    @functools.wraps(rule)
    def run(layers: Layers, config: Any, context: dict) -> dict:
        started = time.perf_counter()
        rule(layers, config, context)
        return {"init_seconds": round(time.perf_counter() - started, 3)}

    return run


def kaiming(rows: int, cols: int, device: Any) -> torch.Tensor:
    """nn.Linear's default init (what LoRA uses for A)."""
    weight = torch.empty(rows, cols, device=device)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


def lora_init(layers: Layers, config: Any, context: dict) -> None:
    """A Kaiming, B zero (and Hydra's sequential pair likewise): ΔW = 0 at step 0."""
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.copy_(kaiming(layer.rank, layer.in_features, layer.lora_A.device))
            layer.lora_B.zero_()
            if layer.sequential:
                layer.seq_A.copy_(kaiming(layer.rank, layer.out_features, layer.seq_A.device))
                layer.seq_B.zero_()


def aflora_init(layers: Layers, config: Any, context: dict) -> None:
    """A and B Kaiming, Λ_d = d_init (the diagonal core), Λ_u = 0 (a vector of `out` that
    scales B's rows): ΔW = 0. The freezing scores' running averages start at zero."""
    with torch.no_grad():
        for layer in layers.values():
            device = layer.lora_A.device
            layer.lora_A.copy_(kaiming(layer.rank, layer.in_features, device))
            layer.lora_B.copy_(kaiming(layer.out_features, layer.rank, device))
            layer.lora_M.fill_(config.d_init)
            layer.aflora_u = nn.Parameter(torch.zeros(layer.out_features, device=device))
            layer.make_B = _scaled_rows(layer)
            layer.factor_params = {"B": [layer.lora_B, layer.aflora_u]}
            for name in ("A", "B"):
                factor = layer.lora_A if name == "A" else layer.lora_B
                layer.register_buffer(f"aflora_ipt_{name}", torch.zeros_like(factor))
                layer.register_buffer(f"aflora_unc_{name}", torch.zeros_like(factor))
            layer.state_buffers = ("aflora_ipt_A", "aflora_unc_A", "aflora_ipt_B", "aflora_unc_B")


def _scaled_rows(layer: LowRankLinear) -> Callable[[], torch.Tensor]:
    return lambda: layer.aflora_u[:, None] * layer.lora_B


def dyrank_init(layers: Layers, config: Any, context: dict) -> None:
    """A and B random, the component gates c zero: ΔW = 0, yet every gate gets a gradient."""
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.copy_(kaiming(layer.rank, layer.in_features, layer.lora_A.device))
            layer.lora_B.copy_(kaiming(layer.out_features, layer.rank, layer.lora_B.device))
            layer.lora_M.zero_()


@timed
def svd_init(layers: Layers, config: Any, context: dict) -> None:
    """B = U_r, M = diag(S_r), A = V_rᵀ from W's SVD (SVFit, SORSA)."""
    with torch.no_grad():
        for layer in layers.values():
            u, s, vh = torch.linalg.svd(layer.base_weight(), full_matrices=False)
            r = layer.rank
            layer.lora_B.copy_(u[:, :r])
            layer.lora_M.copy_(s[:r])
            layer.lora_A.copy_(vh[:r])


@timed
def ldu_init(layers: Layers, config: Any, context: dict) -> None:
    """W = P·L·D·U (pivoted LU, L and U unit triangular): B = P·L[:, :r], M = D[:r],
    A = U[:r], and a trained scalar (1 at init) in front (LoLDU)."""
    with torch.no_grad():
        for layer in layers.values():
            weight = layer.base_weight()
            perm, lower, upper = torch.linalg.lu(weight)
            diag = torch.diagonal(upper).clone()
            tiny = diag.abs() < 1e-12  # an exactly singular pivot: keep U's row as it is
            unit_upper = upper / torch.where(tiny, torch.ones_like(diag), diag)[:, None]
            r = layer.rank
            layer.lora_B.copy_((perm @ lower)[:, :r])
            layer.lora_M.copy_(torch.where(tiny, torch.ones_like(diag), diag)[:r] * ~tiny[:r])
            layer.lora_A.copy_(unit_upper[:r])
            layer.lora_scalar = nn.Parameter(torch.ones((), device=weight.device))


@timed
def nystrom_init(layers: Layers, config: Any, context: dict) -> None:
    """r random columns C = W[:, J] and rows R = W[I, :] of W give W's Nyström
    approximation C·pinv(W[I, J])·R (NLoRA, IntTune). With W[I, J] = U·S·Vᵀ it is set as
    B = C·V·S^-1/2, M = I, A = S^-1/2·Uᵀ·R: the same product, but balanced, where the
    literal B = C, M = pinv(W[I, J]), A = R puts 1/σ_min into M and makes training
    ill-conditioned. Singular values below 1e-4 of the largest are dropped, as pinv does
    for a rank-deficient W[I, J]."""
    with torch.no_grad():
        for index, layer in enumerate(layers.values()):
            weight = layer.base_weight()
            generator = torch.Generator().manual_seed(config.seed * 100_003 + index)
            rows = torch.randperm(layer.out_features, generator=generator)[:layer.rank]
            cols = torch.randperm(layer.in_features, generator=generator)[:layer.rank]
            rows, cols = rows.to(weight.device), cols.to(weight.device)
            u, s, vh = torch.linalg.svd(weight[rows][:, cols])
            inv_root = torch.where(s > s.max() * 1e-4, s.clamp_min(1e-30).rsqrt(),
                                   torch.zeros_like(s))
            layer.lora_B.copy_(weight[:, cols] @ vh.T * inv_root)
            layer.lora_M.copy_(torch.eye(layer.rank, device=weight.device))
            layer.lora_A.copy_(inv_root[:, None] * (u.T @ weight[rows]))


def nola_init(layers: Layers, config: Any, context: dict) -> None:
    """Frozen random bases, regenerated from `basis_seed` (not saved); trained
    coefficients α (random) and β (zero): A = Σ α_i A_i, B = Σ β_j B_j = 0 at init."""
    for index, layer in enumerate(layers.values()):
        device = layer.lora_A.device
        generator = torch.Generator().manual_seed(config.basis_seed * 100_003 + index)
        k, r = config.num_basis, layer.rank
        bases_a = torch.randn(k, r, layer.in_features, generator=generator) / math.sqrt(layer.in_features)
        bases_b = torch.randn(k, layer.out_features, r, generator=generator) / math.sqrt(r)
        layer.register_buffer("nola_bases_A", bases_a.to(device), persistent=False)
        layer.register_buffer("nola_bases_B", bases_b.to(device), persistent=False)
        alpha = torch.randn(k, generator=generator) / math.sqrt(k)
        layer.nola_alpha = nn.Parameter(alpha.to(device))
        layer.nola_beta = nn.Parameter(torch.zeros(k, device=device))
        layer.make_A = _mixture(layer, "nola_alpha", "nola_bases_A")
        layer.make_B = _mixture(layer, "nola_beta", "nola_bases_B")
        # A and B are generated: the stored factors are not used (and not kept)
        del layer.lora_A, layer.lora_B
        layer.lora_A = layer.lora_B = None


def _mixture(layer: LowRankLinear, weights: str, bases: str) -> Callable[[], torch.Tensor]:
    return lambda: torch.einsum("k,k...->...", getattr(layer, weights), getattr(layer, bases))


def shared_init(layers: Layers, config: Any, context: dict) -> None:
    """One A (Kaiming), B (zero) pair per layer shape, shared by its modules; per-module
    rank coefficients start at one (S²LoRA)."""
    shared: dict[tuple[int, int], tuple[nn.Parameter, nn.Parameter]] = {}
    for layer in layers.values():
        shape = (layer.in_features, layer.out_features)
        if shape not in shared:
            device = layer.lora_A.device
            shared[shape] = (nn.Parameter(kaiming(layer.rank, shape[0], device)),
                             nn.Parameter(torch.zeros(shape[1], layer.rank, device=device)))
        layer.lora_A, layer.lora_B = shared[shape]


def gradient_svd_init(layers: Layers, config: Any, context: dict) -> dict:
    """LoRA-SB: G = Σ_tokens δ·xᵀ per layer (its inputs x, output gradients δ) over the
    calibration batches, i.e. the full-weight gradient, even over a frozen quantized
    base; B = U_r, A = V_rᵀ from the SVD of -G, and the core R = 0."""
    model, batches = context["model"], context["batches"]
    started = time.perf_counter()
    grads = {name: torch.zeros(layer.out_features, layer.in_features, device=layer.lora_A.device)
             for name, layer in layers.items()}
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in layers.items():
        base = layer.base_layer

        def keep_input(module: Any, args: tuple, _out: Any, name: str = name) -> None:
            inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()

        def add_gradient(module: Any, _grad_in: tuple, grad_out: tuple, name: str = name) -> None:
            delta = grad_out[0].detach().reshape(-1, grad_out[0].shape[-1]).float()
            grads[name] += delta.T @ inputs.pop(name)

        handles += [base.register_forward_hook(keep_input),
                    base.register_full_backward_hook(add_gradient)]
    device = next(layer.lora_A.device for layer in layers.values())
    embeddings = model.get_input_embeddings()
    handles.append(embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    was_training = model.training
    model.train()
    try:
        for batch in batches:
            inputs_ = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")
                       if k in batch}
            model(**inputs_, use_cache=False).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not batches:
        raise InputError("adapter.calibration: no calibration examples to estimate the gradient")
    with torch.no_grad():
        for name, layer in layers.items():
            u, _, vh = torch.linalg.svd(-grads[name] / len(batches), full_matrices=False)
            layer.lora_B.copy_(u[:, :layer.rank])
            layer.lora_A.copy_(vh[:layer.rank])
            layer.lora_M.zero_()
    return {"calibration_examples": sum(len(b["input_ids"]) for b in batches),
            "init_seconds": round(time.perf_counter() - started, 3)}


def lora_uniform(rows: int, cols: int, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """LoRA's A init (Kaiming-uniform with a = √5: uniform ±1/√fan_in) from `generator`."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound


def mos_init(layers: Layers, config: Any, context: dict) -> dict:
    """MoS: global pools of A and B shards per shard width (A uniform ±1/√in, B zero),
    each layer's own private shards, and fixed routing indices (from `config.seed`) that
    pick every slot's shard. A = bank_A[index_A] cut back into r rows of width in, and
    B = (bank_B[index_B] as r columns of height out): generated each forward, so the shared
    shards are one tensor and its gradient sums over the layers using it. The pools are
    registered on the first layer that uses them only (counted and saved once)."""
    shards = config.shards_per_vector
    private, public = config.slots()
    sizes = config.pool_sizes([(layer.in_features, layer.out_features)
                               for layer in layers.values()])
    generator = torch.Generator().manual_seed(config.seed * 100_003 + 17)
    pools: dict[tuple[str, int], nn.Parameter] = {}
    report = {"private_shards_per_factor": private, "public_shards_per_factor": public,
              "pool_shards": sum(sizes.values())}
    for index, layer in enumerate(layers.values()):
        device = layer.lora_A.device
        layer_gen = torch.Generator().manual_seed(config.seed * 100_003 + index)
        params: dict[str, list[nn.Parameter]] = {"A": [], "B": []}
        for factor, length in (("A", layer.in_features), ("B", layer.out_features)):
            width = length // shards
            key = (factor, width)
            if key not in pools:
                values = (lora_uniform(sizes[key], width, layer.in_features, generator)
                          if factor == "A" else torch.zeros(sizes[key], width))
                pools[key] = nn.Parameter(values.to(device))
                setattr(layer, f"mos_pool_{factor}", pools[key])  # the owner registers it
                params[factor].append(pools[key])
            own = (lora_uniform(private, width, layer.in_features, layer_gen)
                   if factor == "A" else torch.zeros(private, width))
            setattr(layer, f"mos_private_{factor}", nn.Parameter(own.to(device)))
            params[factor].append(getattr(layer, f"mos_private_{factor}"))
            chosen = torch.randperm(sizes[key], generator=layer_gen)[:public]
            slots = torch.cat([chosen, sizes[key] + torch.arange(private)])
            order = torch.randperm(public + private, generator=layer_gen)
            layer.register_buffer(f"mos_index_{factor}", slots[order].to(device), persistent=False)
        layer.mos_pools = [pools[("A", layer.in_features // shards)],
                           pools[("B", layer.out_features // shards)]]  # a list: not registered
        layer.make_A = _routed(layer, "A", layer.rank, layer.in_features)
        layer.make_B = _routed(layer, "B", layer.rank, layer.out_features, columns=True)
        layer.factor_params = params
        del layer.lora_A, layer.lora_B
        layer.lora_A = layer.lora_B = None
    return report


def _routed(layer: LowRankLinear, factor: str, rank: int, length: int,
            columns: bool = False) -> Callable[[], torch.Tensor]:
    pool = layer.mos_pools[0 if factor == "A" else 1]

    def build() -> torch.Tensor:
        bank = torch.cat([pool, getattr(layer, f"mos_private_{factor}")])
        vectors = bank[getattr(layer, f"mos_index_{factor}")].reshape(rank, length)
        return vectors.T if columns else vectors

    return build


def sparse_init(layers: Layers, config: Any, context: dict) -> None:
    """LoRA-SP: A (uniform ±1/√in) and B (zero) drawn from `config.seed`; a seeded random
    `frozen_fraction` of each factor's entries is fixed at those values (buffers,
    regenerated from the seed, not saved) and only the free entries are parameters,
    scattered into the factor each forward."""
    for index, layer in enumerate(layers.values()):
        device = layer.lora_A.device
        generator = torch.Generator().manual_seed(config.seed * 100_003 + index)
        params: dict[str, list[nn.Parameter]] = {}
        initial = {"A": lora_uniform(layer.rank, layer.in_features, layer.in_features, generator),
                   "B": torch.zeros(layer.out_features, layer.rank)}
        for factor, values in initial.items():
            numel = values.numel()
            free = torch.randperm(numel, generator=generator)[config.frozen(numel):].sort().values
            layer.register_buffer(f"sp_init_{factor}", values.to(device), persistent=False)
            layer.register_buffer(f"sp_free_index_{factor}", free.to(device), persistent=False)
            setattr(layer, f"sp_free_{factor}", nn.Parameter(values.flatten()[free].to(device)))
            params[factor] = [getattr(layer, f"sp_free_{factor}")]
        layer.make_A, layer.make_B = _scattered(layer, "A"), _scattered(layer, "B")
        layer.factor_params = params
        del layer.lora_A, layer.lora_B
        layer.lora_A = layer.lora_B = None


def _scattered(layer: LowRankLinear, factor: str) -> Callable[[], torch.Tensor]:
    def build() -> torch.Tensor:
        initial = getattr(layer, f"sp_init_{factor}")
        flat = initial.flatten().scatter(0, getattr(layer, f"sp_free_index_{factor}"),
                                         getattr(layer, f"sp_free_{factor}"))
        return flat.view_as(initial)

    return build
