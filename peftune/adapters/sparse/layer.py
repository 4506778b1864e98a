"""One sparse-delta layer for the sparse methods: y = base(x) + x·ΔWᵀ, ΔW = scatter(idx, δ).

Per targeted linear weight W (out x in): `sparse_indices`, sorted flat indices into W
(row-major: entry (r, c) is r·in + c), and `sparse_values` δ, the trained deltas, one per
index. The trainable parameter and its optimizer state are the k deltas; no dense mask or
dense gradient is kept. The product runs by blocks of rows (`_SparseDeltaProduct`): each
block's rows of ΔW are built densely for the matmul and dropped, and the backward rebuilds
them (nothing dense is saved for it), so the transient memory is one block, at most
`BLOCK_ELEMENTS` entries; δ's gradient is gathered block by block at the indices.

On the same layer, for the methods that need them:

- `sparse_columns` (PaCA): the indices are whole columns J, so the product is
  x[..., J]·Pᵀ with P = δ viewed as (out x |J|): only the selected input features are
  kept for the backward;
- `dense_delta` (LT-SFT's first phase): a dense trained D, y = base(x) + x·Dᵀ, while the
  sparse deltas wait (`sparse_active` False);
- probe entries (SpIEL): `probe_indices` with zero values that take part in the forward
  only to collect their gradient (a plain tensor, not a parameter: no optimizer state);
- the base may itself be a `LowRankLinear` (DSEE: a LoRA path plus the sparse residual).

`delta_weight()` is the exact dense ΔW of the sparse part (and D); merging adds it to the
innermost base weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

BLOCK_ELEMENTS = 1 << 22  # entries of ΔW built at once (16 MB in fp32)


def _row_blocks(indices: torch.Tensor, out_features: int, in_features: int
                ) -> list[tuple[int, int, int, int]]:
    """(first row, end row, first index, end index) of each block of rows of ΔW."""
    rows = max(1, BLOCK_ELEMENTS // max(in_features, 1))
    if rows >= out_features:
        return [(0, out_features, 0, int(indices.numel()))]
    starts = list(range(0, out_features, rows)) + [out_features]
    bounds = torch.searchsorted(indices, torch.tensor(starts, device=indices.device) * in_features)
    cuts = bounds.tolist()
    return [(starts[i], starts[i + 1], cuts[i], cuts[i + 1]) for i in range(len(starts) - 1)]


def _dense_rows(values: torch.Tensor, indices: torch.Tensor, first: int, end: int,
                in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [first, end) of ΔW, dense, from the entries whose indices fall in them."""
    rows = torch.zeros((end - first) * in_features, dtype=dtype, device=values.device)
    rows.index_put_((indices - first * in_features,), values.to(dtype))
    return rows.view(end - first, in_features)


class _SparseDeltaProduct(torch.autograd.Function):
    """x (tokens x in) -> x·ΔWᵀ (tokens x out), ΔW = scatter(indices, values); gradients for
    x and values only, computed by blocks of rows without saving any dense block."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                shape: tuple[int, int], blocks: list[tuple[int, int, int, int]]) -> torch.Tensor:
        out_features, in_features = shape
        ctx.save_for_backward(x, values, indices)
        ctx.shape, ctx.blocks = shape, blocks
        y = x.new_empty(x.shape[0], out_features)
        for first, end, lo, hi in blocks:
            rows = _dense_rows(values[lo:hi], indices[lo:hi], first, end, in_features, x.dtype)
            y[:, first:end] = x @ rows.T
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple:
        x, values, indices = ctx.saved_tensors
        _, in_features = ctx.shape
        grad_y = grad_y.to(x.dtype)
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_values = torch.empty_like(values) if ctx.needs_input_grad[1] else None
        for first, end, lo, hi in ctx.blocks:
            block = grad_y[:, first:end]
            if grad_x is not None:
                grad_x += block @ _dense_rows(values[lo:hi], indices[lo:hi], first, end,
                                              in_features, x.dtype)
            if grad_values is not None:  # (∂L/∂ΔW)[rows] = grad_yᵀ·x, read at the indices
                full = (block.T @ x).reshape(-1)
                grad_values[lo:hi] = full[indices[lo:hi] - first * in_features].to(values.dtype)
        return grad_x, grad_values, None, None, None


def sparse_product(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                   shape: tuple[int, int], blocks: list | None = None) -> torch.Tensor:
    """x·ΔWᵀ for ΔW = scatter(indices, values) of `shape` (indices sorted)."""
    blocks = blocks if blocks is not None else _row_blocks(indices, *shape)
    return _SparseDeltaProduct.apply(x, values, indices, shape, blocks)


class SparseDeltaLinear(nn.Module):
    def __init__(self, base: nn.Module, indices: torch.Tensor, *,
                 columns: torch.Tensor | None = None):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        device = _device_of(base)
        self.register_buffer("sparse_indices", indices.to(device=device, dtype=torch.int64))
        self.sparse_values = nn.Parameter(torch.zeros(indices.numel(), device=device))
        self.register_buffer("sparse_columns", None if columns is None else
                             columns.to(device=device, dtype=torch.int64))
        self.sparse_active = True  # False while LT-SFT's dense phase runs
        self.dense_delta: nn.Parameter | None = None
        self.register_buffer("probe_indices", None)
        self.probe_values: torch.Tensor | None = None  # zeros whose gradient is read (SpIEL)
        self._union: tuple[torch.Tensor, torch.Tensor, list] | None = None
        self._blocks: list | None = None
        self.merged = False

    # ---- the index set ------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def set_indices(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """New sorted indices (same count or not) and their values (zeros by default); the
        parameter object stays the same, so the optimizer keeps pointing at it."""
        device = self.sparse_values.device
        self.sparse_indices = indices.to(device=device, dtype=torch.int64)
        with torch.no_grad():
            self.sparse_values.data = (torch.zeros(indices.numel(), device=device) if values is None
                                       else values.to(device=device, dtype=torch.float32).clone())
        self._blocks = None
        self._union = None

    def set_probes(self, indices: torch.Tensor | None) -> None:
        """Entries outside the index set whose gradient the forward collects (None: none)."""
        if indices is None or indices.numel() == 0:
            self.probe_indices, self.probe_values, self._union = None, None, None
            return
        device = self.sparse_values.device
        self.probe_indices = indices.to(device=device, dtype=torch.int64)
        self.probe_values = torch.zeros(indices.numel(), device=device, requires_grad=True)
        self._union = None

    def blocks(self) -> list:
        if self._blocks is None:
            self._blocks = _row_blocks(self.sparse_indices, self.out_features, self.in_features)
        return self._blocks

    def _union_order(self) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(sorted indices of active + probe entries, the order that sorts them, blocks)."""
        if self._union is None:
            joined = torch.cat([self.sparse_indices, self.probe_indices])
            union, order = torch.sort(joined, stable=True)
            self._union = (union, order, _row_blocks(union, self.out_features, self.in_features))
        return self._union

    # ---- forward ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return out
        h = x.reshape(-1, self.in_features).to(_compute_dtype(x))
        delta = None
        if self.sparse_active and self.sparse_values.numel():
            delta = self._sparse(h)
        if self.dense_delta is not None and self.dense_delta.numel():
            dense = F.linear(h, self.dense_delta.to(h.dtype))
            delta = dense if delta is None else delta + dense
        if delta is None:
            return out
        return out + delta.reshape(*out.shape[:-1], self.out_features).to(out.dtype)

    def _sparse(self, h: torch.Tensor) -> torch.Tensor:
        if self.sparse_columns is not None:  # PaCA: y = x[..., J]·Pᵀ
            p = self.sparse_values.view(self.out_features, -1).to(h.dtype)
            return F.linear(h.index_select(1, self.sparse_columns), p)
        if self.probe_values is not None and self.training:
            union, order, blocks = self._union_order()
            values = torch.cat([self.sparse_values, self.probe_values])[order]
            return sparse_product(h, values, union, self.shape, blocks)
        return sparse_product(h, self.sparse_values, self.sparse_indices, self.shape, self.blocks())

    # ---- weights, merge -----------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """The exact ΔW (out x in, fp32) of the sparse deltas (and LT-SFT's D)."""
        delta = torch.zeros(self.numel, device=self.sparse_values.device)
        with torch.no_grad():
            if self.sparse_active:
                delta.index_put_((self.sparse_indices,), self.sparse_values.detach().float(),
                                 accumulate=False)
            delta = delta.view(self.shape)
            if self.dense_delta is not None and self.dense_delta.numel():
                delta += self.dense_delta.detach().float()
        return delta

    def linear(self) -> nn.Module:
        """The innermost base linear (under DSEE's low-rank layer)."""
        module = self.base_layer
        while hasattr(module, "base_layer"):
            module = module.base_layer
        return module

    def merged_weight(self) -> torch.Tensor:
        """W + ΔW of the whole layer (the low-rank path included), fp32."""
        weight = self.linear().weight.detach().float() + self.delta_weight()
        low_rank = self.base_layer
        if hasattr(low_rank, "export_factors"):
            b_mat, a_mat = low_rank.export_factors()
            weight += (b_mat @ a_mat).to(weight.device)
        return weight


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the delta's product: autocast's when it is on (like the base matmul),
    else the input's own, never below fp32 for an fp32 input."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype if x.is_floating_point() else torch.float32


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def sparse_layers(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    """name -> layer of every SparseDeltaLinear in `model` (names as in the bare base)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, SparseDeltaLinear)}
