"""EoRA: training-free compensation of a quantized base in the eigenspace of its inputs.

Liu et al. 2024, "EoRA: Fine-tuning-free Compensation for Compressed LLM with Eigenspace
Low-Rank Approximation" (arXiv:2410.21271). For a linear layer y = W·x whose base computes
with Q = dequant(q(W)), the error the layer makes on its inputs X (d_in x n) is
(W - Q)·X. EoRA picks the rank-r B·A minimising ||(ΔW - B·A)·X||_F, ΔW = W - Q, rather than
||ΔW - B·A||_F (plain SVD, as LoftQ's single step): directions the inputs rarely take cost
little. With the input covariance C = X·Xᵀ/n = V·Λ·Vᵀ and S = V·Λ^½, the minimiser is the
truncated SVD of ΔW·S = U·Σ·Pᵀ mapped back: B·A = U_r·Σ_r·P_rᵀ·Λ^-½·Vᵀ. We split it as
B = U_r·Σ_r^½ / s and A = Σ_r^½·P_rᵀ·Λ^-½·Vᵀ, s the LoRA layer's scaling, so the adapter
starts as the compensation and LoRA training continues from there (QLoRA with an EoRA
init), or, untrained, is the compensated 4-bit model (`peftune compensate`).

Readings of details the paper leaves open: C is accumulated over the calibration examples'
real tokens (no padding), in float64; Λ is damped as Λ + `damp`·mean(Λ) (GPTQ's damping),
since directions with no input energy would otherwise get unbounded entries in A; layers
that read the same input (q, k, v; gate, up) share one covariance. The reconstruction
errors reported are on the undamped C: the output error tr(E·C·Eᵀ) relative to the
layer's output energy tr(W·C·Wᵀ), before (E = ΔW) and after (E = ΔW - s·B·A), summed over
the layers, and the plain weight error ||E||_F / ||W||_F.

W is read from the model's safetensors files one tensor at a time
(`peftune.adapters.lora.loftq.weight_reader`); Q is the quantized layer's own dequantized
weight (`peftune.quant.dequantize`: bitsandbytes nf4/fp4 and int8, HQQ int4), so the
correction is of exactly what the base computes. The adapter therefore belongs to the
quantized base: `peftune merge` folds such a run into the dequantized weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peftune import compat
from peftune.errors import InputError
from peftune.quant.dequantize import dequantized_weight, is_quantized_linear

LORA_PREFIX = "base_model.model."


def compensate(peft_model: Any, model_path: str, batches: list[dict], *, damp: float,
               plain_svd: dict | None = None) -> dict:
    """Set A, B of every LoRA layer over a quantized linear to its EoRA compensation, from
    the inputs of `batches` (padded micro-batches with attention masks); returns the report
    (layers, errors before and after, seconds). Given a dict as `plain_svd`, it also fills it
    with each layer's (A, B) of the plain rank-r SVD of the error (LoftQ's fit, the baseline
    EoRA improves on) and adds that fit's errors to the report."""
    import time

    import torch

    from peftune.adapters.lora.loftq import weight_reader

    started = time.perf_counter()
    layers = list(quantized_lora_layers(peft_model))
    if not layers:
        raise InputError("quant.compensation: no LoRA layer sits on a quantized linear layer; "
                         "target the model's linear layers (adapter.target_modules: all-linear)")
    covariances, tokens = input_covariances(peft_model, layers, batches)
    if tokens == 0:
        raise InputError("quant.compensation.calibration: the calibration examples have no "
                         "tokens; give more examples or another data file")
    read = weight_reader(Path(model_path), key="quant.compensation")
    fits = ("before", "after") + (("svd",) if plain_svd is not None else ())
    output = dict.fromkeys((*fits, "norm"), 0.0)
    weight_sums = dict.fromkeys((*fits, "norm"), 0.0)
    bases: dict[int, tuple[Any, Any]] = {}
    for name, module in layers:
        weight = read(name.removeprefix(LORA_PREFIX) + ".weight").to(torch.float64)
        error = weight - dequantized_weight(module.get_base_layer()).to(torch.float64)
        r, scaling, lora_a, lora_b = compat.lora_factors(module)
        cov = covariances[name]
        if id(cov) not in bases:  # layers that share their inputs share the eigenbasis
            bases[id(cov)] = eigenbasis(cov, damp=damp)
        b, a = eora_factors(error, cov, rank=r, damp=damp, basis=bases[id(cov)])
        with torch.no_grad():
            lora_a.copy_(a.to(lora_a.dtype))
            lora_b.copy_((b / scaling).to(lora_b.dtype))
        residuals = {"before": error, "after": error - b @ a, "norm": weight}
        if plain_svd is not None:
            u, s, vh = torch.linalg.svd(error, full_matrices=False)
            half = s[:r].sqrt()
            svd_b, svd_a = u[:, :r] * half, half[:, None] * vh[:r]
            plain_svd[name] = (svd_a.to(lora_a.dtype), (svd_b / scaling).to(lora_b.dtype))
            residuals["svd"] = error - svd_b @ svd_a
        for fit, residual in residuals.items():
            output[fit] += output_energy(residual, cov)
            weight_sums[fit] += float(residual.pow(2).sum())
    report = {"compensation": "eora", "compensated_layers": len(layers),
              "calibration_tokens": tokens}
    for fit in fits:
        report[f"output_error_{fit}"] = round((output[fit] / output["norm"]) ** 0.5, 6)
        report[f"weight_error_{fit}"] = round((weight_sums[fit] / weight_sums["norm"]) ** 0.5, 6)
    report["compensation_seconds"] = round(time.perf_counter() - started, 3)
    return report


def set_factors(peft_model: Any, factors: dict) -> None:
    """Load (A, B) per LoRA layer name into the model's LoRA layers."""
    import torch

    for name, module in quantized_lora_layers(peft_model):
        _, _, lora_a, lora_b = compat.lora_factors(module)
        a, b = factors[name]
        with torch.no_grad():
            lora_a.copy_(a)
            lora_b.copy_(b)


def current_factors(peft_model: Any) -> dict:
    """(A, B) per LoRA layer over a quantized linear, copied."""
    factors = {}
    for name, module in quantized_lora_layers(peft_model):
        _, _, lora_a, lora_b = compat.lora_factors(module)
        factors[name] = (lora_a.detach().clone(), lora_b.detach().clone())
    return factors


def eigenbasis(cov: Any, *, damp: float) -> tuple[Any, Any]:
    """The damped eigenvalues' square roots and the eigenvectors of `cov` (float64)."""
    import torch

    eigenvalues, eigenvectors = torch.linalg.eigh(cov.to(torch.float64))
    eigenvalues = eigenvalues.clamp(min=0.0)
    eigenvalues = eigenvalues + damp * eigenvalues.mean().clamp(min=1e-12)
    return eigenvalues.sqrt(), eigenvectors


def eora_factors(error: Any, cov: Any, *, rank: int, damp: float,
                 basis: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
    """B (out x r), A (r x in) with B·A the rank-`rank` minimiser of ||(error - B·A)·X||_F
    for inputs of covariance `cov` (damped by `damp`·mean eigenvalue); float64. `basis`:
    `eigenbasis(cov, damp=damp)`, when the caller has it already."""
    import torch

    root, eigenvectors = basis if basis is not None else eigenbasis(cov, damp=damp)
    u, s, ph = torch.linalg.svd(error.to(torch.float64) @ (eigenvectors * root),
                                full_matrices=False)
    r = min(rank, s.numel())
    half = s[:r].sqrt()
    b = u[:, :r] * half
    a = (half[:, None] * ph[:r] / root) @ eigenvectors.T
    if r < rank:  # a rank above the layer's: the rest of the factors stay zero
        b = torch.nn.functional.pad(b, (0, rank - r))
        a = torch.nn.functional.pad(a, (0, 0, 0, rank - r))
    return b, a


def output_energy(matrix: Any, cov: Any) -> float:
    """tr(M·C·Mᵀ): the mean squared output of M over inputs of covariance C."""
    return float(((matrix @ cov) * matrix).sum())


def input_covariances(model: Any, layers: list[tuple[str, Any]],
                      batches: list[dict]) -> tuple[dict[str, Any], int]:
    """Each layer's input covariance X·Xᵀ/n over the real tokens of `batches` (float64), one
    forward per example without its padding; layers fed the same tensor share one matrix.
    Returns the covariances by layer name and n."""
    import torch

    from peftune.adapters.calibration import on_device

    sums: dict[str, Any] = {}
    owner_of: dict[str, str] = {}  # a layer -> the layer whose matrix it shares
    # this forward's input tensors, each with the first layer it fed; held, so that no later
    # tensor of the forward can take a freed one's memory (and pass for it)
    seen: list[tuple[Any, str]] = []

    def hook_for(name: str) -> Any:
        def hook(module: Any, args: tuple) -> None:
            x = args[0]
            first = next((owner for tensor, owner in seen if tensor is x), None)
            if first is not None:
                owner_of.setdefault(name, first)
                return
            seen.append((x, name))
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            if name not in sums:
                sums[name] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64,
                                         device=flat.device)
            sums[name].addmm_(flat.T, flat)
        return hook

    handles = [module.get_base_layer().register_forward_pre_hook(hook_for(name))
               for name, module in layers]
    tokens = 0
    try:
        with torch.no_grad():
            for batch in on_device(model, batches):
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                    seen.clear()
                    real = ids[mask.bool()][None]
                    model(input_ids=real, use_cache=False)
                    tokens += real.shape[1]
    finally:
        for handle in handles:
            handle.remove()
    covariances = {name: value / max(tokens, 1) for name, value in sums.items()}
    for name, owner in owner_of.items():
        covariances[name] = covariances[owner]
    return covariances, tokens


def quantized_lora_layers(model: Any) -> Iterator[tuple[str, Any]]:
    """(name, LoRA layer) for every LoRA layer of `model` whose base layer is quantized."""
    for name, module in compat.lora_layers(model):
        if is_quantized_linear(module.get_base_layer()):
            yield name, module
