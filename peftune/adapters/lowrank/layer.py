"""One generalised low-rank layer for the native methods: y = base(x) + s · B·M·A·x.

The factors are A (r x in), an optional core M (r x r, or a diagonal / gate vector of r),
and B (out x r), each trainable or frozen, and s the scaling. On top of that one shape:

- `residual`: the method moved its initial factors out of the frozen weight
  (W -> W - s·B0·M0·A0, e.g. SVFit's top singular triplets), so the model is unchanged at
  init; the initial product is kept to export the exact change W_trained - W_original;
- `rank_limit`: only the first b components are used this step (DyLoRA's sampled rank),
  with scaling alpha / b;
- `mask`: components switched off for good (SoRA's zero gates, dyrank's pruning);
- `scalar`: a trained scalar multiplying the update (LoLDU);
- `sequential`: Hydra's second branch, B_s·A_s applied to the base's output W·x (bias
  excluded), so ΔW = B_s·A_s·W;
- factor generators (NOLA): A or B computed each forward from trained coefficients over
  frozen random bases.

`delta_weight()` is the exact ΔW of the current factors; `export_factors()` gives the
(B', A') of a plain LoRA with scaling 1 whose product is the layer's whole change to W.
The base may be `nn.Linear` or a bitsandbytes 4/8-bit linear (its output is used, its
weight only by residual methods, which are refused over quantized bases).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class LowRankLinear(nn.Module):
    def __init__(self, base: nn.Module, *, rank: int, scaling: float, dropout: float = 0.0,
                 core: str | None = None, sequential: bool = False):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.rank = rank
        self.alpha_scaling = scaling  # s at full rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype = torch.float32
        device = _device_of(base)
        self.lora_A = nn.Parameter(torch.zeros(rank, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        self.core_kind = core  # None | "full" (r x r) | "diag" (a vector of r)
        if core == "full":
            self.lora_M = nn.Parameter(torch.eye(rank, dtype=dtype, device=device))
        elif core == "diag":
            self.lora_M = nn.Parameter(torch.ones(rank, dtype=dtype, device=device))
        else:
            self.lora_M = None
        self.lora_scalar: nn.Parameter | None = None
        self.register_buffer("lora_mask", torch.ones(rank, dtype=dtype, device=device))
        self.masked = False  # whether lora_mask has zeros (a Python flag: no sync per forward)
        self.rank_limit: int | None = None  # components used while training (DyLoRA)
        self.eval_rank: int | None = None  # components used in eval mode and export
        self.sequential = sequential
        if sequential:
            self.seq_A = nn.Parameter(torch.zeros(rank, self.out_features, dtype=dtype, device=device))
            self.seq_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        # Generators replace a factor by a function of trained coefficients (NOLA).
        self.make_A: Callable[[], torch.Tensor] | None = None
        self.make_B: Callable[[], torch.Tensor] | None = None
        self.residual = False
        self.merged = False

    # ---- factors ----------------------------------------------------------------------

    def factor_A(self) -> torch.Tensor:
        return self.make_A() if self.make_A is not None else self.lora_A

    def factor_B(self) -> torch.Tensor:
        return self.make_B() if self.make_B is not None else self.lora_B

    def scaling(self) -> float:
        b = self.active()
        return self.alpha_scaling * self.rank / b  # alpha / b (alpha / r at full rank)

    def core_matrix(self) -> torch.Tensor:
        """M as an r x r matrix, the mask and the scalar folded in."""
        device = self.lora_mask.device
        if self.lora_M is None:
            core = torch.eye(self.rank, device=device)
        elif self.core_kind == "diag":
            core = torch.diag(self.lora_M)
        else:
            core = self.lora_M
        core = core * self.lora_mask[:, None]  # a masked component contributes nothing
        if self.lora_scalar is not None:
            core = core * self.lora_scalar
        return core

    def active(self) -> int:
        limit = self.rank_limit if self.training else self.eval_rank
        return self.rank if limit is None else min(limit, self.rank)

    def delta_weight(self) -> torch.Tensor:
        """The exact ΔW the adapter adds to W now (out x in), at the current rank limit."""
        b = self.active()
        core = self.core_matrix()[:b, :b]
        delta = self.scaling() * self.factor_B()[:, :b] @ core @ self.factor_A()[:b]
        if self.sequential:
            delta = delta + self.alpha_scaling * self.seq_B @ self.seq_A @ self.base_weight()
        return delta

    def base_weight(self) -> torch.Tensor:
        """W as the base computes with it (dequantized for a bitsandbytes 4-bit layer)."""
        weight = self.base_layer.weight
        if type(weight).__name__ == "Params4bit":
            import bitsandbytes as bnb

            return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
        return weight.detach().float()

    # ---- forward ----------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return out
        b = self.active()
        h = self.dropout(x).to(torch.float32)
        z = F.linear(h, self.factor_A()[:b])
        if self.lora_M is not None or self.lora_scalar is not None or self.masked:
            z = F.linear(z, self.core_matrix()[:b, :b])
        delta = F.linear(z, self.factor_B()[:, :b]) * self.scaling()
        if self.sequential:
            wx = out if getattr(self.base_layer, "bias", None) is None else out - self.base_layer.bias
            delta = delta + F.linear(F.linear(wx.to(torch.float32), self.seq_A), self.seq_B) \
                * self.alpha_scaling
        return out + delta.to(out.dtype)

    # ---- residual inits, merge and export ---------------------------------------------

    def move_into_factors(self) -> None:
        """Residual init: W -> W - ΔW0 for the current factors, so the model is unchanged;
        ΔW0's factors are kept (as buffers) to export W_trained - W_original exactly."""
        with torch.no_grad():
            delta = self.delta_weight()
            weight = self.base_layer.weight
            weight.data -= delta.to(weight.dtype)
        b0, a0 = self.plain_factors()
        self.register_buffer("init_B", b0.detach().clone())
        self.register_buffer("init_A", a0.detach().clone())
        self.residual = True

    def plain_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A') with B'·A' = ΔW of the adapter as it is (scaling folded into B')."""
        b = self.active()
        keep = self.lora_mask[:b] > 0
        if self.core_kind == "diag":  # a zero gate is a pruned rank (SoRA)
            keep &= self.lora_M[:b] != 0
        core = self.core_matrix()[:b, :b][keep][:, keep]
        scale = self.scaling()
        b_mat = self.factor_B()[:, :b][:, keep] @ core * scale
        a_mat = self.factor_A()[:b][keep]
        if self.sequential:
            b_mat = torch.cat([b_mat, self.seq_B * self.alpha_scaling], dim=1)
            a_mat = torch.cat([a_mat, self.seq_A @ self.base_weight()], dim=0)
        return b_mat, a_mat

    def export_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A'), scaling 1, whose product is the layer's whole change to the original W."""
        with torch.no_grad():
            b_mat, a_mat = self.plain_factors()
            if self.residual:  # W_res + ΔW - W = ΔW - ΔW0
                b_mat = torch.cat([b_mat, -self.init_B], dim=1)
                a_mat = torch.cat([a_mat, self.init_A], dim=0)
        return b_mat.detach().float().cpu().contiguous(), a_mat.detach().float().cpu().contiguous()

    def merge(self) -> None:
        """Fold ΔW into a float base weight (quantized bases are merged by `peftune merge`)."""
        if self.merged:
            return
        with torch.no_grad():
            self._merged_delta = self.delta_weight().to(self.base_layer.weight.dtype)
            self.base_layer.weight.data += self._merged_delta
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            self.base_layer.weight.data -= self._merged_delta
        del self._merged_delta
        self.merged = False


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def lowrank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    """name -> layer of every LowRankLinear in `model` (names as in the bare base model)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, LowRankLinear)}
