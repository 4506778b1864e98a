"""`peftune merge`: fold an adapter into its base and write a verified Hugging Face model.

`run_merge(*, ...)` takes a run directory (its recipe names the base, quantization and
method), `--base PATH --adapter DIR`, or a merge.yaml (several LoRAs, `peftune.merge.multi`).

- Plain LoRA adapters (LoRA, rsLoRA, the residual inits and every native low-rank method,
  which all export plain LoRA) stream: ΔW = scale·B·A is added to each base tensor as its
  shard is read (`writer`), in fp32, exactly.
- Other mergeable methods (DoRA, LoHa, LoKr, VeRA, OFT, IA3, ...) merge through peft's own
  `merge_and_unload` on the fp32 base, which is exact for them, then are written the same way.
- A run trained over a 4-/8-bit base merges into the original unquantized weights at
  `model.path`; a base that exists only quantized is dequantized first, with a warning.
- Every merge is verified (`verify`; streamed plain LoRA module by module, so the check does
  not hold the model either) before it appears at --out: written to a temp dir
  beside it, renamed into place only when the logits match; nothing is left otherwise.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from peftune.errors import InputError, TrainingError

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
    """A local model directory, or a hub id's snapshot in the local cache."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
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
    if job["quant"] != "none" and adapter is not None:
        say(quiet, f"note: trained over a {job['quant']} base; merging into the unquantized "
                   f"weights of {base} (the original model)")
    config = read_adapter_config(adapter) if adapter is not None else None
    streaming = config is None or (is_plain_lora(config) and not quantized_checkpoint)
    tmp = temp_dir_for(out)
    try:
        if streaming:
            stats, files, mode = _stream(base, adapter, tmp, dtype=dtype, shard_bytes=shard_bytes)
        else:
            if quantized_checkpoint:
                warnings.append(f"{base} holds only quantized weights: merging into their "
                                "dequantized values (the unquantized original is not available)")
                warn(warnings[-1])
            stats, files, mode = _in_memory(base, adapter, tmp, dtype=dtype,
                                            shard_bytes=shard_bytes,
                                            dequantize=quantized_checkpoint)
        if adapter is not None and stats.modules_changed == 0 and stats.tensors_replaced == 0:
            message = (f"--adapter {adapter}: the adapter changes nothing (every ΔW is zero: "
                       "an untrained or fully pruned adapter)")
            if not allow_noop:
                raise InputError(f"{message}; pass --allow-noop to write the base unchanged")
            warnings.append(message)
            warn(message)
        from peftune.merge.verify import compare

        written_dtype = dtype if dtype != "auto" else _stored_dtype(base)
        reference, base_logits, merged_logits, how = _verification_logits(
            base, adapter, tmp, lazy=streaming, dequantize=quantized_checkpoint)
        check = compare(merged=merged_logits, reference=reference, base=base_logits,
                        dtype=written_dtype)
        check.how = how
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
    _print_summary(report, out, quiet)
    return report


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

    lora = load_lora_adapter(adapter)
    check_adapter_matches(lora, base)
    stats, files = write_merged(base=base, out=tmp, delta_of=_lazy_deltas(lora),
                                replaced=lora.replaced, dtype=dtype, shard_bytes=shard_bytes,
                                tokenizer_from=adapter)
    return stats, files, "streaming ΔW = scale·B·A"


def _lazy_deltas(lora: Any):
    modules = {lora.weight_name(m): m for m in lora.factors}

    def delta_of(name: str):
        module = modules.get(name)
        return None if module is None else lora.delta(module)

    return delta_of


def check_adapter_matches(lora: Any, base: Path, *, flag: str = "--adapter") -> None:
    """Every module the adapter changes exists in the base, with the delta's shape."""
    from peftune.merge.writer import base_tensor_shapes

    shapes = base_tensor_shapes(base)
    trained_on = lora.config.get("base_model_name_or_path")
    for name, shape in {**lora.shapes(), **{k: tuple(v.shape) for k, v in lora.replaced.items()}}.items():
        if name not in shapes:
            raise InputError(f"{flag} {lora.path} does not match the base {base}: the base has "
                             f"no tensor {name} (the adapter was trained on {trained_on}); merge "
                             "it into the base it was trained on")
        if shapes[name] != shape:
            raise InputError(f"{flag} {lora.path} does not match the base {base}: {name} is "
                             f"{'x'.join(map(str, shapes[name]))} in the base but "
                             f"{'x'.join(map(str, shape))} in the adapter (trained on "
                             f"{trained_on}); merge it into the base it was trained on")


def _load_base(base: Path, *, dequantize: bool) -> Any:
    """The base in fp32 on CPU; a quantized checkpoint dequantized into plain nn.Linear."""
    import torch

    from peftune.models import load_model
    from peftune.recipe.schema import ModelSection, QuantSection

    if not dequantize:
        return load_model(ModelSection(path=str(base), dtype="float32"), QuantSection(),
                          device=torch.device("cpu"))
    from peft.utils.integrations import dequantize_bnb_weight
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, device_map={"": "cpu"}, use_safetensors=True)
    for name, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        if weight is not None and type(weight).__name__ in ("Params4bit", "Int8Params"):
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False  # see ENVIRONMENT.md
            plain = torch.nn.Linear(module.in_features, module.out_features,
                                    bias=module.bias is not None)
            plain.weight.data = dequantize_bnb_weight(weight, state=getattr(module, "state", None)).float()
            if module.bias is not None:
                plain.bias.data = module.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain)
    model.float()
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.is_quantized = False
    return model


def _attach(model: Any, base: Path, adapter: Path) -> Any:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        lines = str(err).strip().splitlines()
        detail = next((line.strip() for line in lines if "size mismatch" in line),
                      lines[0] if lines else type(err).__name__)
        raise InputError(f"--adapter {adapter} does not match the base {base}: {detail[:200]}; "
                         "merge it into the base it was trained on") from None


def _in_memory(base: Path, adapter: Path, tmp: Path, *, dtype: str, shard_bytes: int,
               dequantize: bool):
    """peft's own merge (exact for the method) on the fp32 base, then the same writer."""
    import torch

    from peftune.merge.writer import DTYPES, MergeStats, ShardWriter, copy_model_files

    peft_model = _attach(_load_base(base, dequantize=dequantize), base, adapter)
    before = {n.replace(".base_layer.", "."): p.detach().clone()
              for n, p in peft_model.get_base_model().state_dict().items()}
    merged = peft_model.merge_and_unload()
    state = merged.state_dict()
    stats, writer = MergeStats(), ShardWriter(tmp, shard_bytes)
    names = list(_checkpoint_names(base)) if not dequantize else list(state)
    for name in names:
        key = name if name in state else next((k for k in state if k.endswith(name)), None)
        if key is None:
            continue
        tensor = state[key]
        old = before.get(key)
        if old is not None and old.shape == tensor.shape and not torch.equal(old, tensor):
            stats.add(name, old.float(), tensor.float() - old.float())
        target = DTYPES.get(dtype, tensor.dtype) if tensor.is_floating_point() else tensor.dtype
        writer.add(name, tensor.to(target))
    files = writer.close()
    copy_model_files(base, tmp, dtype=dtype if dtype in DTYPES else
                     ("float32" if dequantize else None), tokenizer_from=adapter)
    return stats, files, "peft merge_and_unload (fp32)"


def _checkpoint_names(base: Path):
    from peftune.merge.writer import base_tensor_shapes

    return base_tensor_shapes(base).keys()


def _verification_logits(base: Path, adapter: Path | None, tmp: Path, *, lazy: bool,
                         dequantize: bool):
    """(reference, base, merged) probe logits and how they were computed. Streaming merges of
    plain LoRA verify module by module (`verify.LazyWeights`: one module's weights in memory at
    a time): merged files against the base files with the adapter's own forward
    x·W + scale·B(A x) added at each adapted layer; other merges load whole models (peft)."""
    from peftune.merge.verify import MissingTensor, lazy_logits, lora_forward, probe_inputs
    from peftune.models import load_tokenizer

    if lazy:
        from peftune.merge.deltas import load_lora_adapter

        inputs = probe_inputs(load_tokenizer(str(tmp)))
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
                return (reference, base_logits if lora is not None else None, merged,
                        "module by module: merged files vs base files + the LoRA forward")
            except MissingTensor:
                pass  # a layer the lazy LoRA path does not cover: the whole-model check
    reference, base_logits = _reference_logits(base, adapter, dequantize=dequantize)
    return (reference, base_logits, _merged_logits(tmp),
            "whole models: merged model vs base + adapter through peft")


def _reference_logits(base: Path, adapter: Path | None, *, dequantize: bool):
    """Logits of base + adapter (unmerged, through peft) and of the base, in fp32."""
    from peftune.merge.verify import probe_inputs, probe_logits
    from peftune.models import load_tokenizer

    inputs = probe_inputs(load_tokenizer(str(base)))
    model = _load_base(base, dequantize=dequantize)
    base_logits = probe_logits(model, inputs)
    if adapter is None:
        return base_logits, None
    model = _attach(model, base, adapter)
    reference = probe_logits(model, inputs)
    del model
    return reference, base_logits


def _merged_logits(tmp: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from peftune.merge.verify import probe_inputs, probe_logits
    from peftune.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, use_safetensors=True)
    return probe_logits(model, probe_inputs(load_tokenizer(str(tmp))))


def _print_summary(report: dict, out: Path, quiet: bool) -> None:
    check = report["verification"]
    what = (f"{report['adapter']} ({report['method'] or 'adapter'})" if report["adapter"]
            else f"{report['base']} (already merged by {report['method']})")
    say(quiet, f"merged {what} into {report['base']} [{report['mode']}]: "
               f"{report['modules_changed']} modules changed, relative delta norm "
               f"{report['relative_delta_norm']:.4g}")
    say(quiet, f"verified on {check['probes']} probes: max logit error "
               f"{check['max_abs_logit_error']:.3g} (relative {check['relative_logit_error']:.3g}, "
               f"tolerance {check['tolerance']:g} for {check['dtype']}); the adapter moves logits "
               f"by up to {check['adapter_effect_max_abs_logit']:.3g}")
    shards = len(report["shards"])
    say(quiet, f"wrote {out} ({shards} shard{'s' if shards != 1 else ''}, {report['dtype']}, "
               f"{report['seconds']:.1f}s); load it with "
               f"AutoModelForCausalLM.from_pretrained('{out}')")
