"""`peftune export`: `run_export(*, ...)` writes a run or a model as one verified GGUF file.

1. What is exported: a training run (its adapter merged into its base through `peftune
   merge`'s verified path; a run over a 4-/8-bit base merges into the original weights), a
   model with `--adapter DIR`, or a model as it is. Everything that can be refused is
   refused before any work: the format and outtype, `--out` (and the Modelfile) already
   there, an adapter no weight change reproduces, an architecture or tokenizer this writer
   does not write, a chat template Ollama's Go templates cannot express.
2. The merge is written into a staging directory beside `--out` (in float16 / bfloat16 for
   those outtypes, so the file then stores exactly the merged values; float32 before
   quantizing), then the GGUF file (`gguf_writer`) into the same staging directory.
3. It is read back (`readback`): metadata with gguf's reader, logits with transformers'
   GGUF loader against the merged model. Only then is it renamed to `--out` (and the
   Modelfile written beside it); on any failure the staging directory goes, and nothing
   was written.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from peftune import dist
from peftune.errors import InputError, TrainingError
from peftune.merge.common import staging_dir

if TYPE_CHECKING:
    from peftune.merge.adapter_merge import MergeJob

FORMATS = ("gguf",)
OUTTYPE_NAMES = ("f16", "bf16", "q8_0", "q4_0")
MERGE_DTYPE = {"f16": "float16", "bf16": "bfloat16", "q8_0": "float32", "q4_0": "float32"}
MODELFILE = "Modelfile"


@dataclass
class Source:
    """What the command line names, resolved (no model loaded yet)."""

    label: str  # for messages and general.name
    job: MergeJob | None  # when an adapter is merged (or a run's trained model copied)
    model_dir: Path  # the model to export as it is, or the merge's base
    run: Path | None


def run_export(*, target: str, adapter: str | None = None, fmt: str = "gguf",
               outtype: str = "f16", out: Path | None = None, ollama: bool = False,
               overwrite: bool = False, allow_noop: bool = False, quiet: bool = False) -> dict:
    """Export, verify and publish; returns the report (also printed unless `quiet`)."""
    started = time.perf_counter()
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt}: unsupported; the export format is gguf")
    if outtype not in OUTTYPE_NAMES:
        raise InputError(f"--outtype {outtype}: unsupported; choose one of "
                         f"{', '.join(OUTTYPE_NAMES)}")
    if dist.world_size() > 1:
        raise InputError("peftune export runs in one process: start it without torchrun / "
                         "accelerate launch")
    source = _resolve(target, adapter)
    out = _check_out(out, source, outtype, overwrite=overwrite)
    modelfile = out.parent / MODELFILE if ollama else None
    if modelfile is not None and modelfile.exists() and not overwrite:
        raise InputError(f"--ollama: {modelfile} exists; pass --overwrite to replace it, or "
                         "choose another --out directory")

    from peftune.export import gguf_writer
    from peftune.export.gguf_vocab import vocab_from_tokenizer
    from peftune.merge import verify
    from peftune.merge.common import stored_dtype

    base_config = gguf_writer.read_config(source.model_dir)
    arch = gguf_writer.check_config(base_config, where=target)
    gguf_writer.plan_tensors(source.model_dir, base_config, arch, outtype)  # refuses early
    # everything the tokenizer gives (vocabulary, probes, Modelfile) is taken now, and the
    # tokenizer let go before the read-back needs the memory
    tokenizer = _tokenizer(source)  # the one the merge writes beside the weights
    vocab = vocab_from_tokenizer(tokenizer, vocab_size=base_config["vocab_size"],
                                 source_pre=_source_pre(source.model_dir), where=target)
    inputs = verify.probe_inputs(tokenizer)
    modelfile_body = None
    if modelfile is not None:
        from peftune.export.modelfile import modelfile_text

        modelfile_body = modelfile_text(out.name, tokenizer, add_bos=vocab.add_bos)
    del tokenizer

    with staging_dir(out, kind="export") as tmp:
        merge_report = None
        model_dir = source.model_dir
        if source.job is not None:
            merge_report = _merge(source, tmp, outtype, allow_noop=allow_noop, quiet=quiet)
            model_dir = tmp / "merged"
            _collect()  # the merge's garbage, before the read-back needs the memory
        report = _write_and_verify(model_dir, tmp / out.name, vocab, inputs, outtype=outtype,
                                   name=source.label, source_dtype=stored_dtype(model_dir))
        if merge_report is not None:
            report["merge"] = {k: merge_report[k] for k in ("mode", "method", "base", "adapter",
                                                            "trained_over", "dtype",
                                                            "modules_changed", "verification")}
        if modelfile_body is not None:
            (tmp / MODELFILE).write_text(modelfile_body)
        os.replace(tmp / out.name, out)
        if modelfile is not None:
            os.replace(tmp / MODELFILE, modelfile)
    report.update(out=str(out), modelfile=str(modelfile) if modelfile else None,
                  seconds=round(time.perf_counter() - started, 3))
    from peftune.export.card import write_export_card

    card = write_export_card(report, source=target, run=source.run, adapter=adapter)
    report["card"] = str(card) if card else None
    _print_summary(report, quiet=quiet)
    return report


def _collect() -> None:
    import gc

    from peftune.merge.writer import release_freed_memory

    gc.collect()
    release_freed_memory()


def _resolve(target: str, adapter: str | None) -> Source:
    from peftune.evaluate.targets import resolve_target
    from peftune.merge.adapter_merge import resolve_job
    from peftune.merge.common import local_model_dir

    if adapter is not None and (Path(target).expanduser() / "recipe.yaml").is_file():
        raise InputError(f"--adapter {adapter}: {target} is a training run, which has its own "
                         "adapter; export the run alone, or give a base model with --adapter")
    resolved = resolve_target(target, adapter=adapter, flag="RUN|MODEL")
    if resolved.adapter is None and resolved.run is None:
        return Source(label=_label(target), job=None, model_dir=local_model_dir(resolved.model.path),
                      run=None)
    _refuse_unmergeable(target, resolved)
    job = resolve_job(target=target, base=None, adapter=adapter)
    return Source(label=_label(str(resolved.run) if resolved.run else adapter or target), job=job,
                  model_dir=job.base, run=resolved.run)


def _refuse_unmergeable(target: str, resolved: object) -> None:
    """An adapter that no weight change reproduces cannot become one GGUF file."""
    from peftune.adapters.registry import get_method, method_names
    from peftune.merge.adapter_merge import NOT_MERGEABLE
    from peftune.merge.deltas import read_adapter_config

    method = resolved.method
    why = None
    if method in method_names() and not get_method(method).mergeable:
        why = f"adapter.method {method} cannot be merged into the weights"
    elif resolved.adapter is not None and (resolved.adapter / "adapter_config.json").is_file():
        kind = read_adapter_config(resolved.adapter).get("peft_type")
        if kind in NOT_MERGEABLE:
            why = f"a {kind} adapter cannot be merged into the weights ({NOT_MERGEABLE[kind]})"
    if why:
        raise InputError(f"{target}: {why}, so it cannot be written as one GGUF file; evaluate "
                         f"or serve it as an adapter instead (peftune eval {target})")


def _label(path: str) -> str:
    parts = [p for p in Path(path).parts if p not in ("adapter", "model", "/")]
    return parts[-1] if parts else str(path)


def _check_out(out: Path | None, source: Source, outtype: str, *, overwrite: bool) -> Path:
    if out is None:
        if source.run is None:
            raise InputError("--out: required when exporting a model (the .gguf file to write); "
                             "a run directory defaults to RUN/export/NAME-OUTTYPE.gguf")
        out = source.run / "export" / f"{source.label}-{outtype}.gguf"
    if out.suffix.lower() != ".gguf":
        raise InputError(f"--out {out}: a GGUF file name ends in .gguf")
    if out.is_dir():
        raise InputError(f"--out {out}: is a directory; give the .gguf file to write")
    if out.exists() and not overwrite:
        raise InputError(f"--out {out}: exists; pass --overwrite to replace it, or choose "
                         "another --out")
    return out


def _tokenizer(source: Source):
    """The tokenizer of the exported model: a merge copies the adapter's tokenizer files over
    the base's when the adapter has them (a run saves its tokenizer there), so the one loaded
    here before merging is the merged model's."""
    from transformers import AutoTokenizer

    from peftune.models.quiet import quiet_libraries

    quiet_libraries()
    adapter = getattr(source.job, "adapter", None)
    directory = adapter if adapter and (adapter / "tokenizer_config.json").is_file() \
        else source.model_dir
    trust = bool(getattr(source.job, "trust_remote_code", False))
    return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust)


def _merge(source: Source, tmp: Path, outtype: str, *, allow_noop: bool, quiet: bool) -> dict:
    """`peftune merge`'s own merge and verification, into the staging directory."""
    from peftune.merge.adapter_merge import merge_adapter
    from peftune.merge.common import say

    job, dtype = source.job, MERGE_DTYPE[outtype]
    if job.adapter is None:  # full / freeze: the trained model itself, copied in `dtype`
        say(quiet, f"copying the trained model {job.base} in {dtype} (verified as peftune merge "
                   "verifies)")
    else:
        if job.quant != "none":
            say(quiet, f"note: trained over a {job.quant} base; merging into the unquantized "
                       f"weights of {job.base} (the original model)")
        say(quiet, f"merging {job.adapter} ({job.method or 'adapter'}) into {job.base} in "
                   f"{dtype} (verified as peftune merge verifies)")
    report = merge_adapter(job, out=tmp / "merged", shard_bytes=1 << 62, dtype=dtype,
                           allow_noop=allow_noop, quiet=True, shard_size="one file")
    check = report["verification"]
    say(quiet, f"  merged: relative logit error {check['relative_logit_error']:.3g} (tolerance "
               f"{check['tolerance']:g})" + (
                   f"; the adapter moves logits by up to "
                   f"{check['adapter_effect_max_abs_logit']:.3g}" if job.adapter else ""))
    return report


def _write_and_verify(model_dir: Path, path: Path, vocab, inputs: list, *, outtype: str,
                      name: str, source_dtype: str) -> dict:
    from peftune.export import gguf_writer, readback
    from peftune.merge import verify
    from peftune.merge.writer import DTYPES

    config = gguf_writer.read_config(model_dir)
    arch = gguf_writer.check_config(config, where=str(model_dir))
    if config["vocab_size"] != len(vocab.tokens):
        raise InputError(f"{model_dir}: vocab_size {config['vocab_size']} after merging, "
                         f"{len(vocab.tokens)} before; export the merged model directory instead")
    content = gguf_writer.content_for(model_dir, config=config, arch=arch, outtype=outtype,
                                      vocab=vocab, name=name)
    began = time.perf_counter()
    gguf_writer.write_gguf(path, model_dir=model_dir, content=content)
    written = time.perf_counter() - began
    weights = readback.RoundedWeights(model_dir, content.plan)
    # parsing the file's metadata is Python (it holds the GIL), the merged model's probe
    # logits mostly torch kernels (which release it): on two cores they overlap
    with ThreadPoolExecutor(1, thread_name_prefix="peftune-gguf-reader") as pool:
        parsing = pool.submit(readback.read_gguf, path)
        unrounded = verify.lazy_logits(model_dir, inputs)
        exact = unrounded
        if weights.needed(DTYPES[source_dtype]):  # the merged model as the file rounds it
            exact = verify.lazy_logits(model_dir, inputs, overrides=weights)
        reader = parsing.result()
    problems = readback.metadata_problems(reader, content)
    if problems:
        raise TrainingError(f"export verification failed: {path.name} does not read back as "
                            f"written ({'; '.join(problems[:3])}); nothing was written. Set "
                            "PEFTUNE_DEBUG=1 and report it")
    logits = readback.gguf_logits(path, reader, inputs, outtype=outtype)
    del reader
    check = readback.compare(logits, exact, unrounded if exact is not unrounded else None,
                             outtype=outtype)
    if not check.exact_ok:
        raise TrainingError(
            f"export verification failed: the GGUF file's logits (as transformers loads it) "
            f"differ from the merged model's, rounded to {outtype} as the file stores it, by "
            f"{check.relative_error:.3g} relative (bound {readback.EXACT:g}; max absolute error "
            f"{check.max_abs_error:.3g}); nothing was written. Set PEFTUNE_DEBUG=1 and report it")
    if not check.rounding_ok:
        raise TrainingError(
            f"export verification failed: rounding to {outtype} changes the model's logits by "
            f"{check.rounding_error:.3g} relative (bound {readback.ROUNDING_BOUND[outtype]:g}; "
            f"next-token agreement {check.top1_agreement:.0%}); nothing was written. Export a "
            "finer --outtype (q8_0, f16)")
    return {"format": "gguf", "outtype": outtype, "architecture": arch.name,
            "bytes": path.stat().st_size, "tensors": content.plan.counts(),
            "f16_fallbacks": content.plan.fallbacks, "tokens": len(vocab.tokens),
            "merges": len(vocab.merges), "pre_tokenizer": vocab.pre, "add_bos": vocab.add_bos,
            "chat_template": bool(vocab.chat_template), "notes": vocab.notes,
            "metadata_keys_checked": len(content.expected_fields()),
            "write_seconds": round(written, 3), "verification": check.as_dict()}


def _source_pre(model_dir: Path) -> str | None:
    """`tokenizer.ggml.pre` of the GGUF file the model was converted from (its name for the
    pre-tokenizer is exact), when the model (or the merge's base) came from one."""
    from peftune.models import catalogue
    from peftune.models.gguf import source_record

    record = source_record(model_dir)
    if record is None:
        return None
    path = Path(record.get("gguf", ""))
    if not path.is_file():  # moved since: the catalogue's copy of the same file, if any
        pulled = [catalogue.pulled_path(m) for m in catalogue.CATALOGUE.values()
                  if m.sha256 == record.get("sha256")]
        path = next((p for p in pulled if p.is_file()), path)
    if not path.is_file():
        return None
    try:
        from transformers.integrations.gguf import read_gguf_metadata

        metadata, _ = read_gguf_metadata(str(path))  # no string arrays: fast
    except Exception:  # noqa: BLE001 - unreadable here: guess the name from tokenizer.json
        return None
    pre = metadata.get("tokenizer.ggml.pre")
    return pre if isinstance(pre, str) else None


def _print_summary(report: dict, *, quiet: bool) -> None:
    from peftune.merge.common import say

    check = report["verification"]
    types = " + ".join(f"{n} {t}" for t, n in sorted(report["tensors"].items()))
    say(quiet, f"wrote {report['out']} ({report['bytes'] / 1e6:.1f} MB, {report['architecture']}, "
               f"{types} tensors, {report['tokens']:,} tokens, {report['merges']:,} merges"
               f"{', chat template' if report['chat_template'] else ''}) in "
               f"{report['seconds']:.1f}s")
    effect = (report.get("merge") or {}).get("verification", {}).get("adapter_effect_max_abs_logit")
    say(quiet, f"verified: {report['metadata_keys_checked']} metadata keys and every tensor read "
               f"back with gguf's reader; transformers' GGUF loader reproduces the merged model "
               f"as the file stores it: relative logit error {check['relative_logit_error']:.3g} "
               f"on {check['probes']} probes (bound {check['bound']:g})")
    if check["rounding_relative_logit_error"]:
        say(quiet, f"rounding to {report['outtype']}: relative logit error "
                   f"{check['rounding_relative_logit_error']:.3g} against the unrounded model "
                   f"(bound {check['rounding_bound']:g}), mean KL divergence "
                   f"{check['kl_divergence_mean']:.3g}, same next token at "
                   f"{check['top1_agreement']:.0%} of positions"
                   + (f"; the adapter moves logits by up to {effect:.3g}" if effect else ""))
    for note in report["notes"] + [f"{n}: rows not a multiple of 32, written F16"
                                   for n in report["f16_fallbacks"]]:
        say(quiet, f"note: {note}")
    if report["card"]:
        say(quiet, f"model card: {report['card']} (every GGUF file exported there)")
    else:
        say(quiet, f"note: {Path(report['out']).parent / 'README.md'} was not written by "
                   "peftune; left as it is, with no model card for this file")
    if report["modelfile"]:
        from peftune.export.modelfile import ollama_name

        say(quiet, f"wrote {report['modelfile']}; create the Ollama model with: ollama create "
                   f"{ollama_name(Path(report['out']))} -f {report['modelfile']}")
