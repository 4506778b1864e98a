"""How each sparse method chooses its first index set, by name (a config's `selection`):
`select(model, names, config, seed=, batches=)` returns, per targeted layer name, the
sorted flat indices into its weight (and, for PaCA, the columns), and a report for the run
header (calibration examples). Papers and formulas:
`configs.py`.

Random draws are seeded by (seed, the layer's name) and never build a dense mask or
permutation of a large weight (`sample_entries`), so they cost memory in proportion to
the entries drawn and give the same draw on every process and on resume.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from peftune.adapters.calibration import on_device
from peftune.adapters.sparse.configs import SparseConfig, entry_count

# layer name -> {"indices": ..., "columns": ...}; and the selection's report
Chosen = dict[str, dict[str, torch.Tensor]]
Selected = tuple[Chosen, dict]


def generator(seed: int, name: str, draw: int = 0) -> torch.Generator:
    """A CPU generator for (seed, layer name, draw number): the same on every process."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 7919
                                          + draw) % (2 ** 63))


def sample_entries(numel: int, count: int, gen: torch.Generator,
                   exclude: torch.Tensor | None = None) -> torch.Tensor:
    """`count` distinct entries of [0, numel) outside the sorted `exclude`, uniformly, sorted
    (fewer when fewer are left). Rejection sampling, O(count) memory, unless the draw is a
    large share of the weight (then a permutation of what is left)."""
    exclude = exclude.cpu() if exclude is not None else torch.empty(0, dtype=torch.int64)
    count = min(count, numel - exclude.numel())
    if count <= 0:
        return torch.empty(0, dtype=torch.int64)
    if 4 * (count + exclude.numel()) >= numel:
        free = torch.ones(numel, dtype=torch.bool)
        free[exclude] = False
        left = free.nonzero().flatten()
        return left[torch.randperm(left.numel(), generator=gen)[:count]].sort().values
    chosen = torch.empty(0, dtype=torch.int64)
    while True:
        draw = torch.randint(0, numel, (2 * (count - chosen.numel()) + 64,), generator=gen)
        pool = torch.unique(torch.cat([chosen, draw]))
        if exclude.numel():
            pool = pool[~torch.isin(pool, exclude)]
        if pool.numel() >= count:
            return pool[torch.randperm(pool.numel(), generator=gen)[:count]].sort().values
        chosen = pool


def random_entries(model: Any, names: dict[str, tuple[int, int]], config: SparseConfig, *,
                   seed: int, **_: Any) -> Selected:
    """k = density·numel entries of each weight, uniformly at random (SpIEL's start)."""
    seed = getattr(config, "seed", seed)
    return {name: {"indices": sample_entries(fan_in * fan_out, config.entries(fan_in, fan_out),
                                             generator(seed, name))}
            for name, (fan_in, fan_out) in names.items()}, {}


def random_columns(model: Any, names: dict[str, tuple[int, int]], config: Any, *,
                   seed: int, **_: Any) -> Selected:
    """PaCA: `columns` input columns of each weight, drawn from the config's seed; the
    indices are every row of those columns, row-major."""
    chosen = {}
    for name, (fan_in, fan_out) in names.items():
        count = config.column_count(fan_in)
        columns = torch.randperm(fan_in, generator=generator(config.seed, name))[:count].sort().values
        rows = torch.arange(fan_out, dtype=torch.int64)[:, None] * fan_in
        chosen[name] = {"indices": (rows + columns[None, :]).reshape(-1), "columns": columns}
    return chosen, {}


def placeholder_entries(model: Any, names: dict[str, tuple[int, int]], config: SparseConfig,
                        **_: Any) -> Selected:
    """LT-SFT: k entries per weight, chosen only after the dense phase; the first k until then."""
    return {name: {"indices": torch.arange(config.entries(fan_in, fan_out))}
            for name, (fan_in, fan_out) in names.items()}, {}


def fisher_mask(model: Any, names: dict[str, tuple[int, int]], config: Any, *,
                batches: list[dict], **_: Any) -> Selected:
    """FISH: the empirical Fisher (mean squared per-example gradient of the loss) of every
    entry of the targeted weights over the calibration examples; the K largest over all
    weights train. Each example runs alone, its padding removed."""
    weights = {name: model.get_submodule(name).weight for name in names}
    fisher = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device)
              for name, w in weights.items()}
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model as it is
    examples = 0
    try:
        for weight in weights.values():
            weight.requires_grad_(True)
        for batch in on_device(model, batches):
            for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"],
                                         batch["labels"], strict=True):
                keep = mask.bool()
                if (labels[keep][1:] == -100).all():
                    continue  # nothing scored: no gradient to count
                loss = model(input_ids=ids[keep][None], labels=labels[keep][None],
                             use_cache=False).loss
                grads = torch.autograd.grad(loss, list(weights.values()))
                for name, grad in zip(weights, grads, strict=True):
                    fisher[name].add_(grad.float().square())
                examples += 1
    finally:
        for weight in weights.values():
            weight.requires_grad_(False)
        model.train(was_training)
    if examples == 0:
        from peftune.errors import InputError

        raise InputError("adapter.calibration: no calibration example has a scored token, so "
                         "the Fisher information is empty; use more or other examples")
    total = sum(f.numel() for f in fisher.values())
    return top_entries(fisher, entry_count(config.density, total)), {"calibration_examples": examples}


def top_entries(scores: dict[str, torch.Tensor], count: int) -> Chosen:
    """The `count` largest scores over every layer (one global ranking; ties by layer order
    then position), as sorted flat indices per layer. Each layer offers only its own top
    `count`, so the ranking never holds all scores at once."""
    offered = {name: torch.topk(s.reshape(-1), min(count, s.numel()), sorted=False)
               for name, s in scores.items()}
    values = torch.cat([top.values.float().cpu() for top in offered.values()])
    owner = torch.cat([torch.full((top.values.numel(),), i, dtype=torch.int64)
                       for i, top in enumerate(offered.values())])
    keep = torch.topk(values, count, sorted=False).indices
    chosen = {}
    for i, (name, top) in enumerate(offered.items()):
        mine = keep[owner[keep] == i]
        start = sum(t.values.numel() for t in list(offered.values())[:i])
        chosen[name] = {"indices": top.indices.cpu()[mine - start].sort().values}
    return chosen


def low_rank_residual(model: Any, names: dict[str, tuple[int, int]], config: Any,
                      **_: Any) -> Selected:
    """DSEE: the k largest entries of |W - W_r|, W_r the best rank-r approximation of W."""
    chosen = {}
    for name, (fan_in, fan_out) in names.items():
        weight = model.get_submodule(name).weight.detach().float()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        rank = min(config.r, s.numel())
        residual = (weight - (u[:, :rank] * s[:rank]) @ vh[:rank]).abs().reshape(-1)
        top = torch.topk(residual, config.entries(fan_in, fan_out), sorted=False).indices
        chosen[name] = {"indices": top.cpu().sort().values}
    return chosen, {}
