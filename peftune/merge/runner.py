"""`peftune merge`: fold an adapter into its base and write a verified Hugging Face model.

`run_merge(*, ...)` takes a run directory (its recipe names the base, quantization and
method), `--base PATH --adapter DIR`, or a merge.yaml (several LoRAs, `peftune.merge.multi`).

- Plain LoRA adapters (LoRA, rsLoRA, the residual inits and every native low-rank method,
  which all export plain LoRA) stream: ΔW = scale·B·A is added to each base tensor as its
  shard is read (`writer`), in fp32, exactly.
- Other mergeable methods (DoRA, LoHa, LoKr, VeRA, OFT, IA3, ...) merge through peft's own
  `merge_and_unload` on the fp32 base, which is exact for them, then are written the same way
  (`whole_model`).
- A run trained over a 4-/8-bit base merges into the original unquantized weights at
  `model.path`; a base that exists only quantized is dequantized first, with a warning.
- Every merge is verified (`verify`) before it appears at --out: written to a temp dir
  beside it, renamed into place only when the logits match; nothing is left otherwise.
  Streamed plain LoRA checks each adapted weight as it is merged (`verify.ModuleCheck`),
  then the written files' logits module by module, so the check does not hold the model.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from peftune.errors import InputError, TrainingError
from peftune.merge.whole_model import merge_in_memory, merged_logits, reference_logits

NOT_MERGEABLE = {
    "PROMPT_TUNING": "it prepends learned virtual tokens to every input",
    "PREFIX_TUNING": "it prepends learned key/value prefixes to every attention layer",
    "P_TUNING": "it prepends virtual tokens computed by a prompt encoder",
    "POLY": "it routes each input through a task-dependent mix of LoRA skills (task_ids)",
    "MULTITASK_PROMPT_TUNING": "it prepends task-specific virtual tokens",
    "ADAPTION_PROMPT": "it adds gated prompt tokens to attention",
    "CPT": "it prepends context-aware virtual tokens",
}


def run_merge(*, target: str | None = None, base: str | None = None, adapter: str | None = None,
              out: Path | None = None, shard_size: str = "5GB", dtype: str = "auto",
              overwrite: bool = False, allow_noop: bool = False, out_rank: int | None = None,
              quiet: bool = False) -> dict:
    """Merge and verify; returns the report written to OUT/merge_report.json."""
    from peftune.merge.writer import check_out_dir, parse_size

    if target is not None and Path(target).suffix in (".yaml", ".yml"):
        from peftune.merge.multi import run_multi_merge

        return run_multi_merge(config_path=Path(target), out=out, shard_size=shard_size,
                               dtype=dtype, overwrite=overwrite, allow_noop=allow_noop,
                               out_rank=out_rank, quiet=quiet)
    if out_rank is not None:
        raise InputError("--out-rank re-factors a multi-adapter merge into a LoRA; it needs a "
                         "merge.yaml (peftune merge merge.yaml --out-rank N)")
    job = resolve_job(target=target, base=base, adapter=adapter)
    shard_bytes = parse_size(shard_size)
    if out is None:
        if job["run"] is None:
            raise InputError("--out: required with --base/--adapter (the directory to write "
                             "the merged model into)")
        if job["adapter"] is None:
            say(quiet, f"already merged: {job['run']}/model is the full trained model (method "
                       f"{job['method']}); load it with AutoModelForCausalLM.from_pretrained, "
                       "or pass --out DIR to copy it with --dtype / --shard-size")
            return {"kind": "already_merged", "model": str(Path(job["run"]) / "model")}
        out = Path(job["run"]) / "merged"
    check_out_dir(out, overwrite=overwrite)
    return _merge(job, out=out, shard_bytes=shard_bytes, dtype=dtype, allow_noop=allow_noop,
                  quiet=quiet, shard_size=shard_size)


def resolve_job(*, target: str | None, base: str | None, adapter: str | None) -> dict:
    """Base dir, adapter dir, method and run of what the command line names (torch-free)."""
    from peftune.adapters.registry import get_method, method_names
    from peftune.evaluate.targets import resolve_target

    if target is None and base is None:
        raise InputError("nothing to merge: give RUN_DIR (a training run), --base PATH "
                         "--adapter DIR, or a merge.yaml")
    if base is not None and adapter is None:
        raise InputError(f"--base {base}: needs --adapter DIR (the PEFT adapter to merge into it)")
    resolved = resolve_target(target, model=base, adapter=adapter, flag="RUN_DIR")
    method = resolved.method
    if method in method_names() and not get_method(method).mergeable:
        from peftune.adapters.bottleneck_configs import NATIVE_CONFIG

        spec = get_method(method)
        native = resolved.adapter is not None and (resolved.adapter / NATIVE_CONFIG).is_file()
        loader = ("peftune.adapters.bottleneck.load_bottleneck(model, ADAPTER_DIR), or "
                  "peftune eval RUN_DIR" if native else "peft.PeftModel.from_pretrained")
        raise InputError(f"RUN_DIR {target}: adapter.method {method} is not mergeable: "
                         f"{_why_not(method, spec)}; serve it as an adapter ({loader}) instead")
    if resolved.adapter is None and (resolved.run is None or method is None
                                     or not get_method(method).trains_base_weights):
        raise InputError(f"RUN_DIR {target}: a model directory without an adapter, so there is "
                         f"nothing to merge; give --base {target} --adapter DIR")
    if resolved.adapter is not None:
        from peftune.merge.deltas import read_adapter_config

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
    return {"run": str(resolved.run) if resolved.run else None, "method": method,
            "adapter": resolved.adapter, "base": base_dir, "quant": resolved.quant.method,
            "trust_remote_code": resolved.model.trust_remote_code}


def _why_not(method: str, spec: Any) -> str:
    return {"prompt": NOT_MERGEABLE["PROMPT_TUNING"], "prefix": NOT_MERGEABLE["PREFIX_TUNING"],
            "ptuning": NOT_MERGEABLE["P_TUNING"], "poly": NOT_MERGEABLE["POLY"],
            "mhr": NOT_MERGEABLE["POLY"]}.get(method, spec.description) + \
        ", which no weight change reproduces"


def local_model_dir(path: str) -> Path:
    """A local model directory, a GGUF file's or catalogue model's converted directory, or a
    hub id's snapshot in the local cache."""
    from peftune.models.catalogue import looks_like_catalogue_name
    from peftune.models.sources import is_gguf, resolve_model_path

    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if is_gguf(path) or looks_like_catalogue_name(path):
        resolved = Path(resolve_model_path(path, key="--base"))
        if resolved.is_dir():  # else a bare hub id (gpt2) the hub cache holds: below
            return resolved
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means: not available locally
        raise InputError(f"--base {path}: no such local model directory and not in the hub "
                         "cache; merging needs the base's weights on disk") from None


def say(quiet: bool, line: str) -> None:
    if not quiet:
        print(line, flush=True)


def warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def temp_dir_for(out: Path) -> Path:
    import os

    tmp = out.parent / f".tmp-merge-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _merge(job: dict, *, out: Path, shard_bytes: int, dtype: str, allow_noop: bool, quiet: bool,
           shard_size: str) -> dict:
    from peftune.merge.deltas import is_plain_lora, read_adapter_config

    started = time.perf_counter()
    warnings: list[str] = []
    base: Path = job["base"]
    adapter: Path | None = job["adapter"]
    quantized_checkpoint = "quantization_config" in json.loads((base / "config.json").read_text())
    if job["quant"] != "none" and adapter is not None and not quantized_checkpoint:
        say(quiet, f"note: trained over a {job['quant']} base; merging into the unquantized "
                   f"weights of {base} (the original model)")
    config = read_adapter_config(adapter) if adapter is not None else None
    streaming = config is None or (is_plain_lora(config) and not quantized_checkpoint)
    tmp = temp_dir_for(out)
    if streaming and config is not None and (config.get("rank_pattern") or
                                             config.get("alpha_pattern")):
        import peft.utils.other  # noqa: F401 - the patterns' scale needs it: not alongside the prefetch
    prefetch = _prefetch_model_classes(base) if streaming else None
    try:
        if streaming:
            stats, files, mode = _stream(base, adapter, tmp, dtype=dtype, shard_bytes=shard_bytes)
        else:
            if quantized_checkpoint:
                warnings.append(f"{base} holds only quantized weights: merging into their "
                                "dequantized values (the unquantized original is not available)")
                warn(warnings[-1])
            stats, files, mode = merge_in_memory(base, adapter, tmp, dtype=dtype,
                                            shard_bytes=shard_bytes,
                                            dequantize=quantized_checkpoint,
                                            trust_remote_code=job["trust_remote_code"])
        if adapter is not None and stats.modules_changed == 0 and stats.tensors_replaced == 0:
            message = (f"--adapter {adapter}: the adapter changes nothing (every ΔW is zero: "
                       "an untrained or fully pruned adapter)")
            if not allow_noop:
                raise InputError(f"{message}; pass --allow-noop to write the base unchanged")
            warnings.append(message)
            warn(message)
        from peftune.merge.verify import compare

        if prefetch is not None:  # transformers' lazy imports are not thread-safe: one at a time
            prefetch.join()
        written_dtype = dtype if dtype != "auto" else _stored_dtype(base)
        reference, base_logits, merged_logits, how = _verification_logits(
            base, adapter, tmp, lazy=streaming, dequantize=quantized_checkpoint,
            trust_remote_code=job["trust_remote_code"],
            modules_checked=stats.module_check is not None)
        check = compare(merged=merged_logits, reference=reference, base=base_logits,
                        dtype=written_dtype)
        check.how = how
        check.modules = stats.module_check
        report = {
            "kind": "adapter" if adapter is not None else "copy", "mode": mode,
            "run": job["run"], "method": job["method"], "base": str(base),
            "adapter": str(adapter) if adapter else None, "trained_over": job["quant"],
            "dtype": written_dtype, "shard_size": shard_size, "shards": files,
            **stats.as_dict(), "verification": check.as_dict(), "warnings": warnings,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if not check.ok:
            raise TrainingError(
                f"merge verification failed: the merged model's logits differ from base + "
                f"adapter by {check.max_abs_error:.3g} (relative {check.relative_error:.3g}, "
                f"tolerance {check.tolerance:g} for {written_dtype}); nothing was written to "
                f"{out}. Set PEFTUNE_DEBUG=1 and report it")
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
        from peftune.merge.writer import publish

        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if prefetch is not None:
            prefetch.join()  # never leave the interpreter with an import half done
    _print_summary(report, out, quiet)
    return report


def _prefetch_model_classes(base: Path) -> Any:
    """Import transformers' model and tokenizer classes for `base` in a background thread,
    started as the streaming merge begins: importing is Python (it holds the GIL) while the
    merge is file reads and writes and torch kernels (which release it), so on two cores the
    two overlap. The caller joins the thread before it touches transformers itself (its lazy
    module is not safe to import from two threads at once) and on every way out; the merge
    in between imports nothing from transformers (peft, which the scale of an adapter with
    rank/alpha patterns needs, is imported before the thread starts). Any failure is left to
    the verification's own import, which reports it."""
    import threading

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


def _stored_dtype(base: Path) -> str:
    config = json.loads((base / "config.json").read_text())
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _stream(base: Path, adapter: Path | None, tmp: Path, *, dtype: str, shard_bytes: int):
    from peftune.merge.writer import write_merged

    if adapter is None:  # full / freeze: re-save model/ with the chosen dtype and shards
        stats, files = write_merged(base=base, out=tmp, delta_of=lambda name: None, replaced={},
                                    dtype=dtype, shard_bytes=shard_bytes, tokenizer_from=None)
        return stats, files, "copy"
    from peftune.merge.deltas import load_lora_adapter
    from peftune.merge.verify import ModuleCheck

    lora = load_lora_adapter(adapter)
    untie = tied_head_sources(lora, base)
    check_adapter_matches(lora, base, untied=untie)
    check = ModuleCheck(lora)
    stats, files = write_merged(base=base, out=tmp, delta_of=_lazy_deltas(lora),
                                replaced=lora.replaced, dtype=dtype, shard_bytes=shard_bytes,
                                tokenizer_from=adapter, check=check, untie=untie)
    stats.module_check = check.as_dict()
    return stats, files, "streaming ΔW = scale·B·A"


def _lazy_deltas(lora: Any):
    modules = {lora.weight_name(m): m for m in lora.factors}

    def delta_of(name: str):
        module = modules.get(name)
        return None if module is None else lora.delta(module)

    return delta_of


_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def tied_head_sources(lora: Any, base: Path) -> dict[str, str]:
    """{output head weight: input embedding weight} when the adapter changes the output head of
    a base whose head is tied to (stored as) its input embedding. A LoRA on such a head adapts
    the output projection only, so the merge writes the head as its own tensor (the embedding
    plus ΔW) and unties it; merging ΔW into the shared tensor would change the inputs too."""
    from peftune.merge.writer import base_tensor_shapes

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


def check_adapter_matches(lora: Any, base: Path, *, flag: str = "--adapter",
                          untied: dict[str, str] | None = None) -> None:
    """Every module the adapter changes exists in the base, with the delta's shape (a tied
    head in `untied` exists as the embedding it shares)."""
    from peftune.merge.writer import base_tensor_shapes, first_mismatch, shape_text

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
    from peftune.merge import verify
    from peftune.merge.verify import MissingTensor, lazy_logits, lora_forward, probe_inputs
    from peftune.models import load_tokenizer

    if lazy:
        from peftune.merge.deltas import load_lora_adapter

        inputs = probe_inputs(load_tokenizer(str(tmp)), max_tokens=verify.SHORT_PROBE_TOKENS
                              if modules_checked else verify.PROBE_TOKENS)
        lora = load_lora_adapter(adapter) if adapter is not None else None
        extra = lora_forward(lora) if lora is not None else None
        if lora is None or extra is not None:
            try:
                if lora is None:
                    base_logits = reference = lazy_logits(base, inputs)
                elif lora.replaced:  # whole replaced tensors: base and reference apart
                    base_logits = lazy_logits(base, inputs)
                    reference = lazy_logits(base, inputs, extra=extra, overrides=lora.replaced)
                else:  # one pass: the probes without and with the LoRA path
                    base_logits, reference = lazy_logits(base, inputs, extra=extra, paired=True)
                merged = lazy_logits(tmp, inputs)
                how = "module by module: merged files vs base files + the LoRA forward"
                if modules_checked:
                    how = ("module by module: every merged weight W' against W·x + "
                           "scale·B(A·x) on random x during the merge, then the merged files "
                           "vs base files + the LoRA forward on short probes")
                return reference, base_logits if lora is not None else None, merged, how
            except MissingTensor:
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
