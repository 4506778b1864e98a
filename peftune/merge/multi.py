"""Several LoRA adapters of one base combined from a merge.yaml (`peftune.merge.config`):
per module, the method of `peftune.merge.combine` on the exact deltas ΔW_i = scale_i·B_i·A_i,
then either streamed into the base (a Hugging Face model, like a single merge) or, with
`out_rank`, re-factored by truncated SVD into one plain LoRA of that rank, with the
truncation error ‖ΔW − B·A‖_F reported (it equals the discarded singular values' norm).

Verification: the written model's logits against the fp32 base with the same merged deltas
added in memory (the combination itself is checked by the formula tests); for `out_rank`,
peft loading the written LoRA against the base with the truncated deltas added.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from peftune.errors import InputError
from peftune.merge.adapter_merge import check_adapter_matches, resolve_job
from peftune.merge.combine import Inputs, refactor_svd, seed_for
from peftune.merge.common import local_model_dir, publish_verified, say, staging_dir, stored_dtype
from peftune.merge.config import MergeSection, where_text
from peftune.merge.deltas import LoraAdapter, is_plain_lora, load_lora_adapter, read_adapter_config
from peftune.merge.registry import MERGE_METHODS
from peftune.merge.verify import compare, probe_inputs, probe_logits
from peftune.merge.whole_model import load_base, merged_logits
from peftune.merge.writer import MergeStats, check_out_dir, copy_model_files, write_merged
from peftune.models import load_tokenizer


def run_multi_merge(config: MergeSection, where: Any, *, out: Path, dtype: str, shard_bytes: int,
                    overwrite: bool, allow_noop: bool, out_rank: int | None, quiet: bool) -> dict:
    """Combine merge.yaml's `adapters:` into their base (or, with `out_rank`, into one LoRA),
    verify, and put the result at `out`; returns the report written beside it."""
    base, loras = resolve_adapters(config, where)
    check_out_dir(out, overwrite=overwrite)
    started = time.perf_counter()
    combined = CombinedDelta(config, loras)
    if config.k is not None:
        name, ranks = min(combined.total_ranks().items(), key=lambda item: item[1])
        if config.k > ranks:
            raise InputError(f"{where_text(where, 'k')}: merge.k: {config.k} is more than the "
                             f"{ranks} rank units the adapters hold for {name}; choose k <= {ranks}")
    with staging_dir(out) as tmp:
        if out_rank is None:
            report = _into_base(base, combined, tmp, dtype=dtype, shard_bytes=shard_bytes)
        else:
            report = _as_lora(base, combined, tmp, rank=out_rank)
        if report["modules_changed"] == 0 and not allow_noop:
            raise InputError(f"{where_text(where, 'adapters')}: the merged adapters change "
                             "nothing (every merged ΔW is zero); pass --allow-noop to write anyway")
        report.update({"kind": "multi", "method": config.method, "base": str(base),
                       "adapters": [{"path": str(lora.path), "weight": a.weight,
                                     "density": config.density_of(i)}
                                    for i, (a, lora) in enumerate(zip(config.adapters, loras, strict=True))],
                       "lambda": config.lambda_, "q": config.q, "seed": config.seed,
                       "seconds": round(time.perf_counter() - started, 3)})
        publish_verified(report, tmp, out)
    check = report["verification"]
    norm = report["relative_delta_norm"]
    say(quiet, f"merged {len(loras)} adapters by {config.method} on {base}: "
               f"{report['modules_changed']} modules changed"
               + (f", relative delta norm {norm:.4g}" if norm is not None else ""))
    if out_rank is not None:
        say(quiet, f"re-factored into a rank-{out_rank} LoRA: truncation error "
                   f"{report['truncation_error']:.4g} (relative {report['relative_truncation_error']:.3g})")
    say(quiet, f"verified: max logit error {check['max_abs_logit_error']:.3g} "
               f"(tolerance {check['tolerance']:g} for {check['dtype']}); wrote {out}")
    return report


def resolve_adapters(config: MergeSection, where: Any) -> tuple[Path, list[LoraAdapter]]:
    """The common base and each adapter's LoRA factors; one line per problem."""
    jobs, bases = [], []
    for i, adapter in enumerate(config.adapters):
        at = f"{where_text(where, 'adapters', i, 'path')}: merge.adapters[{i}].path"
        try:
            job = resolve_job(target=adapter.path, base=None, adapter=None)
        except InputError as err:
            raise InputError(f"{at}: {err.lines[0]}") from None
        if job.adapter is None:
            raise InputError(f"{at}: {adapter.path} trained the full model (no adapter/); "
                             "multi-merging combines LoRA adapters")
        adapter_config = read_adapter_config(job.adapter)
        if not is_plain_lora(adapter_config):
            kind = "DoRA" if adapter_config.get("use_dora") else adapter_config.get("peft_type")
            raise InputError(f"{at}: a {kind} adapter; multi-merging combines plain LoRA deltas "
                             "(B·A); merge it alone with peftune merge RUN_DIR")
        jobs.append(job)
        bases.append(job.base)
    if config.base is not None:
        base = local_model_dir(config.base)
    else:
        resolved = [b.resolve() for b in bases]
        if len(set(resolved)) > 1:
            j = next(i for i, b in enumerate(resolved) if b != resolved[0])
            raise InputError(f"{where_text(where, 'adapters', j, 'path')}: merge.adapters[{j}] "
                             f"was trained on {bases[j]}, merge.adapters[0] on {bases[0]}: "
                             "adapters trained on different bases cannot be merged; set "
                             "merge.base if they are the same model")
        base = bases[0]
    loras = []
    for i, job in enumerate(jobs):
        lora = load_lora_adapter(job.adapter)
        check_adapter_matches(lora, base, flag=f"{where_text(where, 'adapters', i, 'path')}: "
                                               f"merge.adapters[{i}]")
        loras.append(lora)
    return base, loras


class CombinedDelta:
    """The merged ΔW of each base tensor, computed when asked (one module at a time)."""

    def __init__(self, config: MergeSection, loras: list[LoraAdapter]):
        self.config, self.loras = config, loras
        self.method = MERGE_METHODS[config.method].load()
        self.modules = {}
        for lora in loras:
            for module in lora.factors:
                self.modules.setdefault(lora.weight_name(module), module)

    def __call__(self, name: str) -> torch.Tensor | None:
        module = self.modules.get(name)
        if module is None:
            return None
        shape = next(lora.shapes()[name] for lora in self.loras if module in lora.factors)
        deltas = [lora.delta(module) if module in lora.factors else torch.zeros(shape)
                  for lora in self.loras]
        c = self.config
        factors = ([lora.units(module) if module in lora.factors else None for lora in self.loras]
                   if MERGE_METHODS[c.method].uses_k else None)
        inputs = Inputs(deltas=deltas, weights=[a.weight for a in c.adapters],
                        densities=[c.density_of(i) for i in range(len(deltas))], lam=c.lambda_,
                        q=c.q, generators=[torch.Generator().manual_seed(seed_for(c.seed, i, name))
                                           for i in range(len(deltas))],
                        factors=factors, k=c.k,
                        generator=torch.Generator().manual_seed(seed_for(c.seed, -1, name)))
        return self.method(inputs)

    def total_ranks(self) -> dict[str, int]:
        """Base tensor name -> the number of rank units the adapters hold for it."""
        counts = {}
        for name, module in self.modules.items():
            counts[name] = sum(int(lora.units(module)[1].shape[0]) for lora in self.loras
                               if module in lora.factors)
        return counts


def _logits_with_deltas(base: Path, deltas: dict[str, torch.Tensor]):
    """Probe logits of the fp32 base, and of the base with `deltas` added to its weights."""
    inputs = probe_inputs(load_tokenizer(str(base)))
    model = load_base(base, dequantize=False)
    before = probe_logits(model, inputs)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].add_(delta)
    return probe_logits(model, inputs), before, inputs


def _into_base(base: Path, combined: CombinedDelta, tmp: Path, *, dtype: str,
               shard_bytes: int) -> dict:
    stats, files = write_merged(base=base, out=tmp, delta_of=combined, replaced={}, dtype=dtype,
                                shard_bytes=shard_bytes, tokenizer_from=combined.loras[0].path)
    reference, before, _ = _logits_with_deltas(base, {n: combined(n) for n in combined.modules})
    written = dtype if dtype != "auto" else stored_dtype(base)
    check = compare(merged=merged_logits(tmp), reference=reference, base=before, dtype=written)
    return {**stats.as_dict(), "mode": "streaming, into the base", "dtype": written,
            "shards": files, "verification": check.as_dict()}


def _as_lora(base: Path, combined: CombinedDelta, tmp: Path, *, rank: int) -> dict:
    """Truncated SVD of each merged ΔW into a plain PEFT LoRA (alpha = r: scale 1)."""
    from peft import LoraConfig, PeftModel  # heavy (transformers): only this path needs it

    tensors, ranks, truncated = {}, {}, {}
    stats, error_sq, delta_sq = MergeStats(), 0.0, 0.0
    for name, module in combined.modules.items():
        delta = combined(name)
        stats.add(name, torch.ones(1), delta)  # weight norms are not read here
        b_mat, a_mat, error = refactor_svd(delta, rank)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a_mat.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b_mat.contiguous()
        ranks[module] = int(a_mat.shape[0])
        truncated[name] = b_mat @ a_mat
        error_sq += error**2
        delta_sq += float(delta.double().pow(2).sum())
    top = max(ranks.values())
    copy_model_files(combined.loras[0].path, tmp, dtype=None, tokenizer_from=None)
    for stray in ("adapter_config.json", "README.md"):  # the first adapter's, not this one's
        (tmp / stray).unlink(missing_ok=True)
    LoraConfig(r=top, lora_alpha=top, target_modules=sorted(ranks), rank_pattern=dict(ranks),
               alpha_pattern=dict(ranks), task_type="CAUSAL_LM",
               base_model_name_or_path=str(base)).save_pretrained(str(tmp))
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    reference, before, inputs = _logits_with_deltas(base, truncated)
    loaded = PeftModel.from_pretrained(load_base(base, dequantize=False), str(tmp))
    check = compare(merged=probe_logits(loaded, inputs), reference=reference, base=before,
                    dtype="float32")
    return {"modules_changed": stats.modules_changed, "relative_delta_norm": None,
            "mode": f"LoRA of rank {rank} (truncated SVD)", "out_rank": rank,
            "truncation_error": error_sq**0.5,
            "relative_truncation_error": (error_sq / delta_sq) ** 0.5 if delta_sq else 0.0,
            "verification": check.as_dict()}
