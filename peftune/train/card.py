"""The model card: a `README.md` in every finished run directory.

What a reader of the run needs without peftune: the base model (and the GGUF file and hash
it came from), the method and objective with their keys, the quantization, the data with
its counts (and the selection where `data.select` chose the rows), the final losses and the
eval table, the trainable parameters, the time and the hardware, how to load the result
with plain peft / transformers, and the resolved recipe. Everything comes from the run's
summary and recipe.yaml; nothing is measured here.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import yaml

CARD = "README.md"


def write_model_card(out: Path, summary: dict, recipe_yaml: Path) -> Path:
    """Write `out/README.md` from the run's summary and its resolved recipe."""
    path = out / CARD
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(model_card(out, summary, recipe_yaml.read_text()))
    tmp.replace(path)
    return path


def model_card(out: Path, summary: dict, recipe_text: str) -> str:
    recipe = yaml.safe_load(recipe_text) or {}
    model, adapter = recipe.get("model", {}), recipe.get("adapter", {})
    train, data = recipe.get("train", {}), recipe.get("data", {})
    quant = recipe.get("quant", {}).get("method", "none")
    objective = summary.get("objective", {}).get("name", "sft")
    method = adapter.get("method", summary.get("method"))
    full = Path(summary["artifact"]).name == "model"
    lines = [
        f"# {out.name}",
        "",
        f"A `{method}` fine-tune of `{model.get('path')}`"
        + (f" with the `{objective}` objective" if objective != "sft" else "")
        + f", trained by peftune {peftune_version()}.",
        "",
        "## Load it",
        "",
        *_loading(out, summary, model.get("path"), full),
        "## Base model",
        "",
        *base_lines(model, quant, summary.get("model_source")),
        *_from_quant_error(recipe, method),
        "## Method",
        "",
        _keys(f"adapter.method `{method}`", {k: v for k, v in adapter.items() if k != "method"}),
        _keys(f"train.objective `{objective}`",
              {k: v for k, v in (train.get("objective") or {}).items() if k != "name"}
              if isinstance(train.get("objective"), dict) else {}),
        f"- trainable parameters: {summary['trainable_params']:,} of "
        f"{summary['total_params']:,}",
        "",
        "## Data",
        "",
        *_data(data, summary.get("data", {})),
        "## Results",
        "",
        *results_lines(summary),
        "## Training",
        "",
        *_training(train, summary),
        "## Recipe",
        "",
        "The resolved recipe (`recipe.yaml`); `peftune train recipe.yaml` trains it again.",
        "",
        "```yaml",
        recipe_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _loading(out: Path, summary: dict, base: str | None, full: bool) -> list[str]:
    if full:
        return ["A whole model in Hugging Face format (safetensors) in `model/`:", "",
                "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                "", f"model = AutoModelForCausalLM.from_pretrained(\"{out / 'model'}\")",
                f"tokenizer = AutoTokenizer.from_pretrained(\"{out / 'model'}\")", "```", ""]
    source = (summary.get("model_source") or {}).get("converted") or base
    if (out / "adapter" / "peftune_adapter.json").is_file():  # a native adapter, not peft's
        return [
            f"The adapter in `adapter/` is peftune's own format (`{summary.get('method')}` is "
            "not a PEFT method), on the base model below:", "",
            "```python", "from transformers import AutoModelForCausalLM",
            "from peftune.adapters.native import load_native_adapter", "",
            f"base = AutoModelForCausalLM.from_pretrained(\"{source}\")",
            f"model = load_native_adapter(base, \"{out / 'adapter'}\")", "```", "",
            f"`peftune chat {out}` and `peftune eval {out}` take the run directory as it is; "
            f"`peftune merge {out}` writes a plain transformers model where the method merges "
            "(the sparse methods), and refuses where it cannot (an input-dependent router, "
            "adapters beside the base).", ""]
    return [
        "The adapter in `adapter/` is in PEFT format, on the base model below:", "",
        "```python", "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM", "",
        f"base = AutoModelForCausalLM.from_pretrained(\"{source}\")",
        f"model = PeftModel.from_pretrained(base, \"{out / 'adapter'}\")", "```", "",
        f"`peftune merge {out}` writes the merged model (plain transformers, no peft), verified "
        "against the adapter; `peftune chat` and `peftune eval` take the run directory as it is.",
        "",
        f"For llama.cpp and Ollama (Llama-family and Qwen2 models): `peftune export {out} "
        f"--outtype q8_0 --ollama` writes one verified GGUF file and a Modelfile into "
        f"`{out / 'export'}`; then `ollama create {out.name} -f {out / 'export' / 'Modelfile'}`.",
        ""]


def base_lines(model: dict, quant: str, source: dict | None) -> list[str]:
    lines = [f"- `{model.get('path')}` (dtype {model.get('dtype', 'auto')})",
             f"- quantization while training: {quant}"]
    if source:
        lines.append(f"- from the GGUF file `{Path(source['gguf']).name}`, sha256 "
                     f"`{source['sha256']}`" + (f" (catalogue `{source['catalogue']}`, "
                                                f"package `{source['package']}`)"
                                                if source.get("catalogue") else ""))
        lines.append(f"- converted once to `{source['converted']}`")
    return [*lines, ""]


def _from_quant_error(recipe: dict, method: str) -> list[str]:
    """A line for an adapter that starts from the quantization error (EoRA, LoftQ): it
    belongs to the quantized base."""
    quant = recipe.get("quant", {})
    if not quant.get("compensation") and method != "loftq":
        return []
    how = "EoRA's compensation" if quant.get("compensation") else "LoftQ's init"
    return [f"The adapter starts as {how} of the {quant.get('method')} quantization error, "
            f"so it applies to the {quant.get('method')} base (load the base quantized as "
            "above); `peftune merge` folds it into the dequantized weights, which reproduce "
            "the trained model.", ""]


def _keys(title: str, keys: dict) -> str:
    shown = ", ".join(f"`{k}`: {v}" for k, v in keys.items())
    return f"- {title}" + (f": {shown}" if shown else "")


def _data(data: dict, stats: dict) -> list[str]:
    lines = [f"- format `{data.get('format', 'text')}`, max_length {data.get('max_length')}, "
             f"packing {data.get('packing')}",
             f"- train: {_sources(data.get('train'))}: {stats.get('rows_read', 0):,} rows read, "
             f"{stats.get('rows_skipped', 0):,} skipped, {stats.get('train_examples', 0):,} "
             f"examples ({stats.get('train_tokens', 0):,} tokens, "
             f"{stats.get('train_target_tokens', 0):,} targets)"]
    if data.get("val") or stats.get("val_examples"):
        where = _sources(data["val"]) if data.get("val") else f"{data.get('val_ratio')} of train"
        lines.append(f"- validation: {where}: {stats.get('val_examples', 0):,} examples")
    for source in stats.get("mix") or []:  # what a weighted mix drew
        lines.append(f"  - `{source.get('path')}` weight {source.get('weight')}: "
                     f"{number(source.get('share'))} of the examples drawn, "
                     f"{number(source.get('token_share'))} of the tokens")
    selection = stats.get("selection")
    if selection:
        lines.append(f"- selected by `{selection['method']}`: {selection['k']:,} of "
                     f"{selection['pool_size']:,} rows (KL reduction "
                     f"{selection['kl_reduction']:.3f}, random {selection['random_kl_reduction']:.3f}); "
                     f"report in `{selection['dir']}`")
    return [*lines, ""]


def _sources(value: Any) -> str:
    """A data path, or a mix's sources with their weights."""
    if isinstance(value, list):
        return ", ".join(f"`{s['path']}` (weight {s.get('weight', 1)})" if isinstance(s, dict)
                         else f"`{s}`" for s in value)
    return f"`{value}`"


def results_lines(summary: dict) -> list[str]:
    lines = ["| measure | value |", "|---|---|",
             f"| final train loss | {number(summary.get('final_loss'))} |",
             f"| final validation loss | {number(summary.get('final_val_loss'))} |"]
    for name, value in summary.get("objective", {}).items():
        if name.startswith("val_"):
            lines.append(f"| {name.replace('_', ' ')} | {number(value)} |")
    lines.append("")
    for task, metrics in (summary.get("eval") or {}).items():
        lines += [f"Eval `{task}` (`eval/report.json`):", "", "| metric | value |", "|---|---|",
                  *(f"| {name} | {number(value)} |" for name, value in metrics.items()), ""]
    return lines


def _training(train: dict, summary: dict) -> list[str]:
    import torch

    rss = summary.get("peak_rss_bytes")
    tokens_per_s = summary.get("tokens_per_s")
    return [
        f"- {summary['steps']} optimizer steps ({summary.get('epochs')} epochs), batch "
        f"{train.get('batch_size')} x accumulation {train.get('grad_accum')}, lr "
        f"{train.get('lr')}, seed {train.get('seed')}",
        f"- {summary.get('tokens', 0):,} tokens in {summary.get('train_seconds', 0):,.1f} s"
        + (f" ({tokens_per_s:,.0f} tokens/s)" if tokens_per_s else "")
        + (f", peak RSS {rss / 2**30:.2f} GiB" if rss else ""),
        f"- hardware: {_hardware()}; torch {torch.__version__}", ""]


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name}, {os.cpu_count()} cores"


def number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def peftune_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peftune")
    except PackageNotFoundError:
        return "(source)"
