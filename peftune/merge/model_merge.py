"""Multi-model merging (mergekit-style): full fine-tuned models of one base, from a merge.yaml
with `models:` and `base:`. Per tensor, the task vectors τ_i = θ_i − θ_base go through the
same methods as LoRA deltas (`combine`: linear, task_arithmetic, magnitude_prune, ties,
dare_*, darex_q, pcb), or `slerp` interpolates the two models' weights θ_1, θ_2 at t; the
result is streamed into the base's layout by the same writer as a LoRA merge.

Streaming: every model is read tensor by tensor with plain file reads (`stio`), each model
keeping one shard file open (the one holding the tensor asked for), so memory is about one
tensor per model. Names and shapes are checked against the base from the headers first.

Verification: probe logits of the written files (module by module, `verify.LazyWeights`)
against the base's files with each tensor replaced by its merged value recomputed in memory
when its module runs; this checks the files (names, shards, dtype, the add) but not the
merge formulas, which the tests check by hand.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from peftune.errors import InputError
from peftune.merge import writer
from peftune.merge.combine import Inputs, seed_for
from peftune.merge.common import local_model_dir, publish_verified, say, staging_dir, stored_dtype
from peftune.merge.config import MergeSection, where_text
from peftune.merge.registry import MERGE_METHODS
from peftune.merge.stio import read_tensor
from peftune.merge.verify import compare, lazy_logits, probe_inputs
from peftune.models import load_tokenizer


class ModelFiles:
    """One model directory's tensors by name, read one at a time (one open shard)."""

    def __init__(self, path: Path, label: str):
        if not path.is_dir():
            raise InputError(f"{label}: {path}: no such model directory")
        try:
            shards = writer.base_shards(path)
        except InputError:
            raise InputError(f"{label}: {path} has no model.safetensors or "
                             "model.safetensors.index.json; merging reads safetensors "
                             "weights") from None
        missing = next((shard for shard in shards if not shard.is_file()), None)
        if missing is not None:
            raise InputError(f"{label}: {missing} is listed in the index but missing")
        self.path, self.location = path, writer.tensor_locations(shards)
        self._open: tuple[Path, object] | None = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(info["shape"]) for name, (_, _, info) in self.location.items()}

    def read(self, name: str) -> torch.Tensor:
        shard, start, info = self.location[name]
        if self._open is None or self._open[0] != shard:
            self.close()
            self._open = (shard, open(shard, "rb"))  # noqa: SIM115 - closed by close()
        return read_tensor(self._open[1], start, info)

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None


def check_same_layout(base: ModelFiles, models: list[ModelFiles], where: Any) -> None:
    """Every model holds exactly the base's tensors, with the base's shapes (the headers'
    check a LoRA merge makes too: `writer.first_mismatch`)."""
    base_shapes = base.shapes()
    for i, model in enumerate(models):
        at = f"{where_text(where, 'models', i, 'path')}: merge.models[{i}].path: {model.path}"
        found = writer.first_mismatch(base_shapes, model.shapes())
        if found is not None:
            name, in_base, here = found
            if here is None:
                raise InputError(f"{at} has no tensor {name} of merge.base: not a fine-tune of "
                                 "that base (different architecture)")
            raise InputError(f"{at} does not match merge.base: {name} is {writer.shape_text(here)} "
                             f"here but {writer.shape_text(in_base)} in the base")
        extra = sorted(set(model.location) - set(base.location))
        if extra:
            raise InputError(f"{at} has tensor {extra[0]}, which merge.base lacks: not a "
                             "fine-tune of that base (different architecture)")


class MergedTensor:
    """name -> the merged tensor's delta to the base (fp32), or None for non-float tensors."""

    def __init__(self, config: MergeSection, base: ModelFiles, models: list[ModelFiles]):
        self.config, self.base, self.models = config, base, models
        self.method = MERGE_METHODS[config.method].load()

    def delta(self, name: str) -> torch.Tensor | None:
        theta = self.base.read(name)
        if not theta.is_floating_point():
            return None
        theta = theta.float()
        weights = [m.read(name).float() for m in self.models]
        c = self.config
        if c.method == "slerp":
            return self.method(Inputs(deltas=weights, weights=[1.0, 1.0], densities=[1.0, 1.0],
                                      t=c.t)) - theta
        n = len(weights)
        inputs = Inputs(deltas=[w - theta for w in weights], weights=[m.weight for m in c.models],
                        densities=[c.density_of(i) for i in range(n)], lam=c.lambda_, q=c.q,
                        generators=[torch.Generator().manual_seed(seed_for(c.seed, i, name))
                                    for i in range(n)])
        return self.method(inputs)

    def __contains__(self, name: object) -> bool:  # LazyWeights overrides: θ_base + delta
        return name in self.base.location

    def __getitem__(self, name: str) -> torch.Tensor:
        delta = self.delta(name)
        theta = self.base.read(name)
        return theta if delta is None else theta.float() + delta


def run_model_merge(config: MergeSection, where: Any, *, out: Path, dtype: str,
                    shard_bytes: int, overwrite: bool, allow_noop: bool, quiet: bool) -> dict:
    """Merge merge.yaml's `models:` over `base:`, verify, and put the result at `out`;
    returns the report written beside it."""
    base_dir = local_model_dir(config.base)
    base = ModelFiles(base_dir, f"{where_text(where, 'base')}: merge.base")
    models = [ModelFiles(Path(m.path).expanduser(), f"{where_text(where, 'models', i, 'path')}: "
                         f"merge.models[{i}].path") for i, m in enumerate(config.models)]
    check_same_layout(base, models, where)
    writer.check_out_dir(out, overwrite=overwrite)
    started = time.perf_counter()
    merged = MergedTensor(config, base, models)
    with staging_dir(out) as tmp:
        try:
            stats, files = writer.write_merged(base=base_dir, out=tmp, delta_of=merged.delta,
                                               replaced={}, dtype=dtype, shard_bytes=shard_bytes,
                                               tokenizer_from=models[0].path)
            if stats.modules_changed == 0 and not allow_noop:
                raise InputError(f"{where_text(where, 'models')}: the merged models equal the "
                                 "base (every task vector is zero); pass --allow-noop to write "
                                 "anyway")
            inputs = probe_inputs(load_tokenizer(str(tmp)))
            base_logits = lazy_logits(base_dir, inputs)
            reference = lazy_logits(base_dir, inputs, overrides=merged)
            written = dtype if dtype != "auto" else stored_dtype(base_dir)
            check = compare(merged=lazy_logits(tmp, inputs), reference=reference,
                            base=base_logits, dtype=written)
            check.how = ("module by module: written files vs the base with each tensor's "
                         "merged value recomputed in memory")
            report = {**stats.as_dict(), "kind": "models", "method": config.method,
                      "base": str(base_dir), "mode": "streaming task vectors, tensor by tensor",
                      "models": [{"path": str(m.path), "weight": c.weight,
                                  "density": config.density_of(i)}
                                 for i, (m, c) in enumerate(zip(models, config.models, strict=True))],
                      "lambda": config.lambda_, "q": config.q, "t": config.t, "seed": config.seed,
                      "dtype": written, "shards": files, "verification": check.as_dict(),
                      "seconds": round(time.perf_counter() - started, 3)}
            publish_verified(report, tmp, out)
        finally:
            for m in (base, *models):
                m.close()
    say(quiet, f"merged {len(models)} models by {config.method} on {base_dir}: "
               f"{report['modules_changed']} tensors changed; verified: max logit error "
               f"{check.max_abs_error:.3g} (tolerance {check.tolerance:g}); wrote {out}")
    return report
