"""One adapter folded into its base: a training run directory (its recipe names the base,
quantization and method) or `--base PATH --adapter DIR`.

- Plain LoRA adapters (LoRA, rsLoRA, the residual inits and every native low-rank method,
  which all export plain LoRA) stream: ΔW = scale·B·A is added to each base tensor as its
  shard is read (`writer`), in fp32, exactly.
- Other mergeable methods (DoRA, LoHa, LoKr, VeRA, OFT, IA3, ...) merge through peft's own
  `merge_and_unload` on the fp32 base, which is exact for them, then are written the same way
  (`whole_model`); so do native adapters that merge (the sparse methods: W + ΔW at their
  indices), through the `merge_and_unload` their loader gives the model.
- A run trained over a 4-/8-bit base merges into the original unquantized weights at
  `model.path`; a base that exists only quantized is dequantized first, with a warning.
- A run that trained the whole model (full, freeze) has no adapter: its model/ is copied
  with the chosen dtype and shards.
- Streamed plain LoRA checks each adapted weight as it is merged (`verify.ModuleCheck`),
  then the written files' logits module by module, so the check does not hold the model.

transformers and peft are imported inside the functions that use them: a streaming merge
imports transformers in a background thread while it reads and writes tensors
(`_prefetch_model_classes`), which an import at the top of a module would serialise.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from peftune import compat
from peftune.adapters.native import NATIVE_CONFIG, NATIVE_WEIGHTS, is_native_adapter
from peftune.adapters.registry import get_method, method_names
from peftune.errors import InputError
from peftune.evaluate.targets import resolve_target
from peftune.merge import verify
from peftune.merge.common import (
    local_model_dir,
    publish_verified,
    say,
    staging_dir,
    stored_dtype,
    warn,
)
from peftune.merge.deltas import (
    LoraAdapter,
    is_plain_lora,
    lazy_deltas,
    load_lora_adapter,
    read_adapter_config,
)
from peftune.merge.whole_model import merge_in_memory, merged_logits, reference_logits
from peftune.merge.writer import base_tensor_shapes, first_mismatch, shape_text, write_merged
from peftune.models import load_tokenizer

NOT_MERGEABLE = {
    "PROMPT_TUNING": "it prepends learned virtual tokens to every input",
    "PREFIX_TUNING": "it prepends learned key/value prefixes to every attention layer",
    "P_TUNING": "it prepends virtual tokens computed by a prompt encoder",
    "POLY": "it routes each input through a task-dependent mix of LoRA skills (task_ids)",
    "MULTITASK_PROMPT_TUNING": "it prepends task-specific virtual tokens",
    "ADAPTION_PROMPT": "it adds gated prompt tokens to attention",
    "CPT": "it prepends context-aware virtual tokens",
}


@dataclass(frozen=True)
class MergeJob:
    """What a merge target names, checked and resolved to directories on disk."""

    run: str | None  # the training run directory, when the target is one
    method: str | None  # the run's adapter.method
    adapter: Path | None  # the PEFT adapter; None: the run trained the whole model (model/)
    base: Path  # the base's weights (a run without adapter: its trained model/)
    quant: str  # the quantization the run trained over ("none" for none)
    trust_remote_code: bool
    # The run's adapter starts from the quantization error (loftq, quant.compensation): it
    # belongs to the dequantized base, not the original weights; the run's model and quant
    # sections rebuild that base.
    into_quantized: bool = False
    model_section: Any = None
    quant_section: Any = None


def resolve_job(*, target: str | None, base: str | None, adapter: str | None) -> MergeJob:
    """Base dir, adapter dir, method and run of what the command line names (torch-free)."""
    if target is None and base is None:
        raise InputError("nothing to merge: give RUN_DIR (a training run), --base PATH "
                         "--adapter DIR, or a merge.yaml")
    if base is not None and adapter is None:
        raise InputError(f"--base {base}: needs --adapter DIR (the PEFT adapter to merge into it)")
    resolved = resolve_target(target, model=base, adapter=adapter, flag="RUN_DIR")
    method = resolved.method
    if method in method_names() and not get_method(method).mergeable:
        spec = get_method(method)
        native = resolved.adapter is not None and (resolved.adapter / NATIVE_CONFIG).is_file()
        loader = ("peftune.adapters.native.load_native_adapter(model, ADAPTER_DIR), "
                  "peftune eval RUN_DIR or peftune chat RUN_DIR" if native
                  else "peft.PeftModel.from_pretrained")
        raise InputError(f"RUN_DIR {target}: adapter.method {method} is not mergeable: "
                         f"{_why_not(method, spec)}; serve it as an adapter ({loader}) instead")
    if resolved.adapter is None and (resolved.run is None or method is None
                                     or not get_method(method).trains_base_weights):
        raise InputError(f"RUN_DIR {target}: a model directory without an adapter, so there is "
                         f"nothing to merge; give --base {target} --adapter DIR")
    if resolved.adapter is not None and is_native_adapter(resolved.adapter):  # sparse methods
        if not (resolved.adapter / NATIVE_WEIGHTS).is_file():
            raise InputError(f"--adapter {resolved.adapter}: no {NATIVE_WEIGHTS} (the adapter's "
                             "weights); point it at a complete adapter directory")
    elif resolved.adapter is not None:
        config = read_adapter_config(resolved.adapter)
        kind = config.get("peft_type")
        if kind in NOT_MERGEABLE:
            raise InputError(f"--adapter {resolved.adapter}: a {kind} adapter is not mergeable: "
                             f"{NOT_MERGEABLE[kind]}, which no weight change reproduces; serve "
                             "it as an adapter instead")
        if not (resolved.adapter / "adapter_model.safetensors").is_file():
            raise InputError(f"--adapter {resolved.adapter}: no adapter_model.safetensors (the "
                             "adapter's weights); point it at a complete PEFT adapter directory")
    base_dir = local_model_dir(resolved.model.path) if resolved.adapter is not None else \
        Path(resolved.model.path)
    into_quantized = resolved.run is not None and resolved.adapter is not None and (
        method == "loftq" or getattr(resolved.quant, "compensation", None) is not None)
    return MergeJob(run=str(resolved.run) if resolved.run else None, method=method,
                    adapter=resolved.adapter, base=base_dir, quant=resolved.quant.method,
                    trust_remote_code=resolved.model.trust_remote_code,
                    into_quantized=into_quantized, model_section=resolved.model,
                    quant_section=resolved.quant)


def _why_not(method: str, spec: Any) -> str:
    return {"prompt": NOT_MERGEABLE["PROMPT_TUNING"], "prefix": NOT_MERGEABLE["PREFIX_TUNING"],
            "ptuning": NOT_MERGEABLE["P_TUNING"], "poly": NOT_MERGEABLE["POLY"],
            "mhr": NOT_MERGEABLE["POLY"]}.get(method, spec.description) + \
        ", which no weight change reproduces"


def merge_adapter(job: MergeJob, *, out: Path, shard_bytes: int, dtype: str, allow_noop: bool,
                  quiet: bool, shard_size: str) -> dict:
    """Merge `job`'s adapter into its base (or copy a whole trained model), verify, and put
    the result at `out`; returns the report written beside it."""
    if not job.into_quantized:
        return _merge_adapter(job, out=out, shard_bytes=shard_bytes, dtype=dtype,
                              allow_noop=allow_noop, quiet=quiet, shard_size=shard_size)
    import tempfile

    from peftune.quant.dequantize import write_dequantized_base

    why = ("LoftQ" if job.method == "loftq" else "quant.compensation: eora")
    say(quiet, f"note: the adapter starts from the {job.quant} quantization error ({why}), so "
               f"it merges into the dequantized {job.quant} weights it trained over, not the "
               f"original ones (which would add that error twice)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-dequantized-", dir=out.parent) as scratch:
        from peftune.merge.writer import DTYPES

        kept = DTYPES.get(stored_dtype(job.base), DTYPES["float32"])
        base = write_dequantized_base(job.model_section, job.quant_section, Path(scratch),
                                      dtype=kept)
        report = _merge_adapter(replace(job, base=base), out=out, shard_bytes=shard_bytes,
                                dtype=dtype, allow_noop=allow_noop, quiet=quiet,
                                shard_size=shard_size, base_name=f"{job.base} (dequantized "
                                f"{job.quant})")
    return report


def _merge_adapter(job: MergeJob, *, out: Path, shard_bytes: int, dtype: str, allow_noop: bool,
                   quiet: bool, shard_size: str, base_name: str | None = None) -> dict:
    started = time.perf_counter()
    warnings: list[str] = []
    base, adapter = job.base, job.adapter
    quantized_checkpoint = "quantization_config" in json.loads((base / "config.json").read_text())
    if job.quant != "none" and adapter is not None and not quantized_checkpoint \
            and not job.into_quantized:
        say(quiet, f"note: trained over a {job.quant} base; merging into the unquantized "
                   f"weights of {base} (the original model)")
    native = adapter is not None and is_native_adapter(adapter)  # merged by its own loader
    config = read_adapter_config(adapter) if adapter is not None and not native else None
    streaming = not native and (config is None or (is_plain_lora(config)
                                                   and not quantized_checkpoint))
    with staging_dir(out) as tmp:
        if streaming and config is not None and (config.get("rank_pattern") or
                                                 config.get("alpha_pattern")):
            compat.preload_pattern_matching()  # the patterns' scale: not alongside the prefetch
        prefetch = _prefetch_model_classes(base) if streaming else None
        try:
            if streaming:
                stats, files, mode = _stream(base, adapter, tmp, dtype=dtype,
                                             shard_bytes=shard_bytes)
            else:
                if quantized_checkpoint:
                    warnings.append(f"{base} holds only quantized weights: merging into their "
                                    "dequantized values (the unquantized original is not "
                                    "available)")
                    warn(warnings[-1])
                stats, files, mode = merge_in_memory(base, adapter, tmp, dtype=dtype,
                                                     shard_bytes=shard_bytes,
                                                     dequantize=quantized_checkpoint,
                                                     trust_remote_code=job.trust_remote_code)
            if adapter is not None and stats.modules_changed == 0 and stats.tensors_replaced == 0:
                message = (f"--adapter {adapter}: the adapter changes nothing (every ΔW is zero: "
                           "an untrained or fully pruned adapter)")
                if not allow_noop:
                    raise InputError(f"{message}; pass --allow-noop to write the base unchanged")
                warnings.append(message)
                warn(message)
            if prefetch is not None:  # transformers' lazy imports are not thread-safe: one at a time
                prefetch.join()
            written_dtype = dtype if dtype != "auto" else stored_dtype(base)
            reference, base_logits, merged, how = _verification_logits(
                base, adapter, tmp, lazy=streaming, dequantize=quantized_checkpoint,
                trust_remote_code=job.trust_remote_code,
                modules_checked=stats.module_check is not None)
            check = verify.compare(merged=merged, reference=reference, base=base_logits,
                                   dtype=written_dtype)
            check.how = how
            check.modules = stats.module_check
            report = {
                "kind": "adapter" if adapter is not None else "copy", "mode": mode,
                "run": job.run, "method": job.method, "base": base_name or str(base),
                "adapter": str(adapter) if adapter else None, "trained_over": job.quant,
                "dtype": written_dtype, "shard_size": shard_size, "shards": files,
                **stats.as_dict(), "verification": check.as_dict(), "warnings": warnings,
                "seconds": round(time.perf_counter() - started, 3),
            }
            publish_verified(report, tmp, out, failure=(
                f"merge verification failed: the merged model's logits differ from base + "
                f"adapter by {check.max_abs_error:.3g} (relative {check.relative_error:.3g}, "
                f"tolerance {check.tolerance:g} for {written_dtype}); nothing was written to "
                f"{out}. Set PEFTUNE_DEBUG=1 and report it"))
        finally:
            if prefetch is not None:
                prefetch.join()  # never leave the interpreter with an import half done
    _print_summary(report, out, quiet)
    return report


def _prefetch_model_classes(base: Path) -> threading.Thread:
    """Import transformers' model and tokenizer classes for `base` in a background thread,
    started as the streaming merge begins: importing is Python (it holds the GIL) while the
    merge is file reads and writes and torch kernels (which release it), so on two cores the
    two overlap. The caller joins the thread before it touches transformers itself (its lazy
    module is not safe to import from two threads at once) and on every way out; the merge
    in between imports nothing from transformers (peft, which the scale of an adapter with
    rank/alpha patterns needs, is imported before the thread starts). Any failure is left to
    the verification's own import, which reports it."""

    def load() -> None:
        try:
            from transformers import AutoConfig
            from transformers.models.auto import modeling_auto, tokenization_auto  # noqa: F401

            config = AutoConfig.from_pretrained(base)
            modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # imports its module
        except Exception:  # noqa: BLE001, S110 - the verification imports again and reports
            pass

    thread = threading.Thread(target=load, name="peftune-merge-imports", daemon=True)
    thread.start()
    return thread


def _stream(base: Path, adapter: Path | None, tmp: Path, *, dtype: str, shard_bytes: int):
    if adapter is None:  # full / freeze: re-save model/ with the chosen dtype and shards
        stats, files = write_merged(base=base, out=tmp, delta_of=lambda name: None, replaced={},
                                    dtype=dtype, shard_bytes=shard_bytes, tokenizer_from=None)
        return stats, files, "copy"
    lora = load_lora_adapter(adapter)
    untie = tied_head_sources(lora, base)
    check_adapter_matches(lora, base, untied=untie)
    check = verify.ModuleCheck(lora)
    stats, files = write_merged(base=base, out=tmp, delta_of=lazy_deltas(lora),
                                replaced=lora.replaced, dtype=dtype, shard_bytes=shard_bytes,
                                tokenizer_from=adapter, check=check, untie=untie)
    stats.module_check = check.as_dict()
    return stats, files, "streaming ΔW = scale·B·A"


_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def tied_head_sources(lora: LoraAdapter, base: Path) -> dict[str, str]:
    """{output head weight: input embedding weight} when the adapter changes the output head of
    a base whose head is tied to (stored as) its input embedding. A LoRA on such a head adapts
    the output projection only, so the merge writes the head as its own tensor (the embedding
    plus ΔW) and unties it; merging ΔW into the shared tensor would change the inputs too."""
    config = json.loads((base / "config.json").read_text())
    text = config.get("text_config") or {}
    if not config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)):
        return {}
    shapes = base_tensor_shapes(base)
    changed = lora.shapes()
    found = {}
    for name, shape in changed.items():
        if name in shapes or not name.split(".")[-2].endswith("lm_head"):
            continue
        source = [n for n, s in shapes.items() if n.endswith(_EMBEDDING_SUFFIXES) and s == shape]
        if len(source) == 1:
            found[name] = source[0]
    return found


def check_adapter_matches(lora: LoraAdapter, base: Path, *, flag: str = "--adapter",
                          untied: dict[str, str] | None = None) -> None:
    """Every module the adapter changes exists in the base, with the delta's shape (a tied
    head in `untied` exists as the embedding it shares)."""
    changed = {**lora.shapes(), **{k: tuple(v.shape) for k, v in lora.replaced.items()}}
    shapes = base_tensor_shapes(base)
    shapes.update({new: shapes[src] for new, src in (untied or {}).items()})
    found = first_mismatch(changed, shapes)
    if found is None:
        return
    name, shape, in_base = found
    trained_on = lora.config.get("base_model_name_or_path")
    if in_base is None:
        raise InputError(f"{flag} {lora.path} does not match the base {base}: the base has "
                         f"no tensor {name} (the adapter was trained on {trained_on}); merge "
                         "it into the base it was trained on")
    raise InputError(f"{flag} {lora.path} does not match the base {base}: {name} is "
                     f"{shape_text(in_base)} in the base but {shape_text(shape)} in the adapter "
                     f"(trained on {trained_on}); merge it into the base it was trained on")


def _verification_logits(base: Path, adapter: Path | None, tmp: Path, *, lazy: bool,
                         dequantize: bool, trust_remote_code: bool = False,
                         modules_checked: bool = False):
    """(reference, base, merged) probe logits and how they were computed. Streaming merges of
    plain LoRA verify module by module (`verify.LazyWeights`: one module's weights in memory at
    a time): merged files against the base files with the adapter's own forward
    x·W + scale·B(A x) added at each adapted layer; other merges load whole models (peft).
    When every adapted weight was already checked during the merge (`verify.ModuleCheck`),
    the probes are cut to SHORT_PROBE_TOKENS: what is left to check is the written files and
    the model as a whole, which a few tokens through every layer do."""
    if lazy:
        inputs = verify.probe_inputs(load_tokenizer(str(tmp)),
                                     max_tokens=verify.SHORT_PROBE_TOKENS if modules_checked
                                     else verify.PROBE_TOKENS)
        lora = load_lora_adapter(adapter) if adapter is not None else None
        extra = verify.lora_forward(lora) if lora is not None else None
        if lora is None or extra is not None:
            try:
                if lora is None:
                    base_logits = reference = verify.lazy_logits(base, inputs)
                elif lora.replaced:  # whole replaced tensors: base and reference apart
                    base_logits = verify.lazy_logits(base, inputs)
                    reference = verify.lazy_logits(base, inputs, extra=extra,
                                                   overrides=lora.replaced)
                else:  # one pass: the probes without and with the LoRA path
                    base_logits, reference = verify.lazy_logits(base, inputs, extra=extra,
                                                                paired=True)
                merged = verify.lazy_logits(tmp, inputs)
                how = "module by module: merged files vs base files + the LoRA forward"
                if modules_checked:
                    how = ("module by module: every merged weight W' against W·x + "
                           "scale·B(A·x) on random x during the merge, then the merged files "
                           "vs base files + the LoRA forward on short probes")
                return reference, base_logits if lora is not None else None, merged, how
            except verify.MissingTensor:
                pass  # a layer the lazy LoRA path does not cover: the whole-model check
    reference, base_logits = reference_logits(base, adapter, dequantize=dequantize,
                                               trust_remote_code=trust_remote_code)
    return (reference, base_logits, merged_logits(tmp),
            "whole models: merged model vs base + adapter through peft")


def _print_summary(report: dict, out: Path, quiet: bool) -> None:
    check = report["verification"]
    what = (f"{report['adapter']} ({report['method'] or 'adapter'})" if report["adapter"]
            else f"{report['base']} (already merged by {report['method']})")
    say(quiet, f"merged {what} into {report['base']} [{report['mode']}]: "
               f"{report['modules_changed']} modules changed, relative delta norm "
               f"{report['relative_delta_norm']:.4g}")
    say(quiet, f"verified on {check['probes']} probes: relative logit error "
               f"{check['relative_logit_error']:.3g} (tolerance {check['tolerance']:g} for "
               f"{check['dtype']}; max absolute error {check['max_abs_logit_error']:.3g}); the "
               f"adapter moves logits by up to {check['adapter_effect_max_abs_logit']:.3g}")
    shards = len(report["shards"])
    say(quiet, f"wrote {out} ({shards} shard{'s' if shards != 1 else ''}, {report['dtype']}, "
               f"{report['seconds']:.1f}s); load it with "
               f"AutoModelForCausalLM.from_pretrained('{out}')")
