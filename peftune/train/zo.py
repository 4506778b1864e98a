"""Zeroth-order training (`train.strategy: {name: zo}`): forward passes only.

MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes",
arXiv:2305.17333), `variant: mezo`: SPSA over the trainable parameters θ. For each of the
n = `n_samples` directions i of optimizer step t, a seed s_ti = SeedSequence([train.seed, t, i])
and z_i ~ N(0, I) drawn from it, one parameter at a time, regenerated each time it is needed
and never stored:

    θ ← θ + εz;  L+ = L(θ);  θ ← θ - 2εz;  L- = L(θ);  θ ← θ + εz      (ε = `eps`)
    g_i = (L+ - L-) / (2ε)                                          the projected gradient
    θ ← θ - lr·wd·θ - lr · (1/n) Σ_i g_i z_i                        wd on matrices only

L is the loss of the step's whole batch (all `grad_accum` micro-batches on all processes: a
larger batch, not several estimates), evaluated with the random state fixed so both sides
see the same dropout masks. No backward pass and no autograd graph, so memory is that of
inference plus one parameter's z; the optimizer keeps no state but the step count, and the
seeds follow from train.seed and the step, so a resumed run is bitwise the uninterrupted one.
On several DDP processes every rank evaluates its share of the batch, the losses are summed
(one all-reduce per evaluation) and every rank applies the same seeded update: no gradient
is exchanged. The log's `loss` is (L+ + L-)/2 averaged over directions (the method's extra
loss included) and `grad_norm` the mean |g_i|.

ZO-AdaMU (Jiang et al. 2023, "ZO-AdaMU Optimizer: Adapting Perturbation by the Momentum and
Uncertainty in Zeroth-order Optimization", arXiv:2312.15184), `variant: adamu`: the
perturbation itself carries the momentum. With m the previous perturbation (zero at first),
c = `momentum`, α = `uncertainty` and z1, z2 ~ N(0, I) from the step's seed,

    u = (1 - c)·√α·z1 + c·(m + √(1-α)·z2)       a zero-centred and a momentum-centred draw
    g = (L(θ+εu) - L(θ-εu)) / (2ε)
    v ← β2·v + (1-β2)·u²                        the perturbation's second moment (β2 = 0.999)
    θ ← θ - lr·wd·θ - lr · g·u / (√(v / (1-β2^t)) + 1e-8);    m ← u

Simplifications of the paper, on purpose: α, c and β2 are constants (the paper anneals its
smoothing parameters over three phases of the run), v is a running average with bias
correction (the paper's per-step mix of the two squared draws can vanish elementwise and
divide by ~0), and one direction per step (n_samples 1). ZO-AdaMU keeps m and v per trainable
parameter: twice the parameters in optimizer state, still no gradients or activations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

ADAMU_BETA2 = 0.999
ADAMU_EPS = 1e-8


def direction_seed(seed: int, step: int, sample: int) -> int:
    """The seed of direction `sample` of optimizer step `step` (1-based)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, step, sample]).generate_state(1, np.uint64)[0] >> 1)


class ZerothOrder(torch.optim.Optimizer):
    """MeZO's SPSA step (or ZO-AdaMU's) over the param groups (module docstring). `step`
    takes the step's loss as its closure: `closure()` evaluates it at the current weights."""

    forward_only = True  # the loop hands it the loss instead of running a backward pass

    def __init__(self, params: Any, *, lr: float, eps: float = 1e-3, n_samples: int = 1,
                 seed: int = 0, variant: str = "mezo", momentum: float = 0.5,
                 uncertainty: float = 0.5) -> None:
        if variant not in ("mezo", "adamu"):
            raise ValueError(f"variant must be mezo or adamu, got {variant}")
        if variant == "adamu" and n_samples != 1:
            raise ValueError("ZO-AdaMU takes one perturbation per step (n_samples 1)")
        super().__init__(params, {"lr": lr, "weight_decay": 0.0, "zo_step": 0})
        self.eps, self.n_samples, self.seed, self.variant = eps, n_samples, seed, variant
        self.momentum, self.uncertainty = momentum, uncertainty
        self.last_loss, self.last_grad_norm = math.nan, math.nan

    def _directions(self, seed: int) -> Iterator[tuple[dict, Any, Any]]:
        """(group, parameter, its direction), the direction regenerated from `seed` (float32;
        ZO-AdaMU's built around the stored momentum)."""
        generators: dict[Any, Any] = {}
        root_a, root_b = math.sqrt(self.uncertainty), math.sqrt(1.0 - self.uncertainty)
        c = self.momentum
        for group in self.param_groups:
            for param in group["params"]:
                gen = generators.get(param.device)
                if gen is None:
                    gen = generators[param.device] = torch.Generator(param.device).manual_seed(seed)
                z = torch.randn(param.shape, generator=gen, device=param.device)
                if self.variant == "adamu":
                    z2 = torch.randn(param.shape, generator=gen, device=param.device)
                    previous = self.state[param].get("momentum")
                    centre = previous.float() if previous is not None else torch.zeros_like(z)
                    z = z.mul_((1 - c) * root_a).add_(centre.add(z2, alpha=root_b), alpha=c)
                yield group, param, z

    def _move(self, seed: int, scale: float) -> None:
        for _, param, direction in self._directions(seed):
            param.add_(direction.to(param.dtype), alpha=scale)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float:  # type: ignore[override]
        if closure is None:
            raise ValueError("a zeroth-order step needs the step's loss: step(closure)")
        step = self.param_groups[0]["zo_step"] + 1
        seeds = [direction_seed(self.seed, step, i) for i in range(self.n_samples)]
        projected, losses = [], []
        for seed in seeds:
            self._move(seed, self.eps)
            plus = float(closure())
            self._move(seed, -2 * self.eps)
            minus = float(closure())
            self._move(seed, self.eps)  # back to θ (up to rounding, as in MeZO)
            projected.append((plus - minus) / (2 * self.eps))
            losses += [plus, minus]
        self.last_loss = sum(losses) / len(losses)
        self.last_grad_norm = sum(abs(g) for g in projected) / len(projected)
        if not all(math.isfinite(v) for v in [*losses, *projected]):
            return self.last_loss  # no update: the loop stops on the loss
        for group in self.param_groups:
            group["zo_step"] = step
            if group["weight_decay"]:
                for param in group["params"]:
                    param.mul_(1 - group["lr"] * group["weight_decay"])
        if self.variant == "adamu":
            self._adamu_update(seeds[0], projected[0], step)
        else:
            for seed, grad in zip(seeds, projected, strict=True):
                for group, param, z in self._directions(seed):
                    param.add_(z.to(param.dtype), alpha=-group["lr"] * grad / self.n_samples)
        return self.last_loss

    def _adamu_update(self, seed: int, grad: float, step: int) -> None:
        correction = 1 - ADAMU_BETA2 ** step
        for group, param, u in self._directions(seed):  # u read the old momentum: replace it
            state = self.state[param]
            second = state.get("second_moment")
            second = second.float() if second is not None else torch.zeros_like(u)
            second.mul_(ADAMU_BETA2).addcmul_(u, u, value=1 - ADAMU_BETA2)
            scale = second.div(correction).sqrt_().add_(ADAMU_EPS)
            param.add_((u * grad / scale).to(param.dtype), alpha=-group["lr"])
            state["momentum"], state["second_moment"] = u.to(param.dtype), second.to(param.dtype)
