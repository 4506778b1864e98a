"""Init rules of the native low-rank methods, keyed by recipe name. Each sets a layer's
factors from a random draw (seeded by the run), W's SVD, LU or Nyström sketch, or a
gradient estimated over calibration batches; `residual` methods then move the initial
product out of W (done by the caller). Returns what the run header reports, if anything.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftune.adapters.lowrank.layer import LowRankLinear
from peftune.errors import InputError

Layers = dict[str, LowRankLinear]


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


def dyrank_init(layers: Layers, config: Any, context: dict) -> None:
    """A and B random, the component gates c zero: ΔW = 0, yet every gate gets a gradient."""
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.copy_(kaiming(layer.rank, layer.in_features, layer.lora_A.device))
            layer.lora_B.copy_(kaiming(layer.out_features, layer.rank, layer.lora_B.device))
            layer.lora_M.zero_()


def svd_init(layers: Layers, config: Any, context: dict) -> None:
    """B = U_r, M = diag(S_r), A = V_rᵀ from W's SVD (SVFit, SORSA)."""
    with torch.no_grad():
        for layer in layers.values():
            u, s, vh = torch.linalg.svd(layer.base_weight(), full_matrices=False)
            r = layer.rank
            layer.lora_B.copy_(u[:, :r])
            layer.lora_M.copy_(s[:r])
            layer.lora_A.copy_(vh[:r])


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


def _timed(rule: Callable[[Layers, Any, dict], Any]) -> Callable[[Layers, Any, dict], dict]:
    def run(layers: Layers, config: Any, context: dict) -> dict:
        started = time.perf_counter()
        rule(layers, config, context)
        return {"init_seconds": round(time.perf_counter() - started, 3)}

    return run


INITS: dict[str, Callable[[Layers, Any, dict], Any]] = {
    "sora": lora_init, "dylora": lora_init, "slora": lora_init, "lamda": lora_init,
    "hydra": lora_init, "dyrank": dyrank_init, "s2lora": shared_init, "nola": nola_init,
    "svfit": _timed(svd_init), "sorsa": _timed(svd_init), "loldu": _timed(ldu_init),
    "nlora": _timed(nystrom_init), "inttune": _timed(nystrom_init),
    "lora-sb": gradient_svd_init,
}
