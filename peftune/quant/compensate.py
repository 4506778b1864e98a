"""`peftune compensate RECIPE`: a quantized base made better without training (EoRA).

The recipe's base is loaded quantized as `quant:` says, a LoRA adapter (`adapter.r`,
`adapter.target_modules`) is attached and set to EoRA's compensation of every quantized
layer (`peftune.quant.eora`, from `quant.compensation.calibration` examples of data.train),
and the held-out text (data.val, or data.val_ratio of data.train) is scored four times: by
the unquantized base, the quantized base, the quantized base with the plain SVD of its
error (LoftQ's fit: the baseline), and the quantized base with EoRA's compensation.

The output directory is laid out as a run (recipe.yaml + adapter/, a PEFT LoRA adapter
that applies to the quantized base), so `peftune eval DIR [--compare base]` and
`peftune chat DIR` load it, and `compensation.json` holds the figures. It is written beside
`--out` and moved into place at the end: a stopped or failed command leaves nothing there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftune.errors import InputError

REPORT = "compensation.json"


def run_compensate(recipe_path: str | Path, overrides: Sequence[str], *, out: Path | None,
                   overwrite: bool, quiet: bool) -> dict:
    """Compensate, measure, write `out`; returns the report (also compensation.json)."""
    from peftune.merge.common import staging_dir
    from peftune.merge.writer import publish
    from peftune.models.facts import inspect_model
    from peftune.recipe import load_recipe, recipe_to_yaml
    from peftune.train.output import check_data_paths, check_output_dir

    recipe = load_recipe(recipe_path, overrides, inspect_model=inspect_model)
    if recipe.quant.compensation is None:  # the command's point: EoRA at its defaults
        recipe = load_recipe(recipe_path, [*overrides, "quant.compensation=eora"],
                             inspect_model=inspect_model)
    if recipe.data.val is None and recipe.data.val_ratio == 0:
        raise InputError("data.val: peftune compensate scores held-out text before and after "
                         "the compensation; set data.val: FILE (or data.val_ratio: 0.05)")
    out = Path(out) if out is not None else Path(f"{recipe.output.dir}-eora")
    check_output_dir(out, resume=False, overwrite=overwrite)
    check_data_paths(recipe)
    recipe = recipe.model_copy(update={"output": recipe.output.model_copy(
        update={"dir": str(out)})})

    say = (lambda line: None) if quiet else print
    say(f"loading {recipe.model.path} ({recipe.quant.method}) and computing EoRA's "
        f"compensation at rank {recipe.adapter.r} ...")
    built, batches, scores = _compensated_scores(recipe)
    say(f"scoring {scores['tokens']:,} held-out target tokens with the unquantized base ...")
    scores["unquantized"] = _unquantized_nll(recipe, batches, device=built.accelerator.device)
    report = _report(recipe, built.hooks.init_report, scores)
    with staging_dir(out, kind="compensate") as tmp:
        built.hooks.export(built.unwrapped_model, tmp / "adapter", built.tokenizer)
        (tmp / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        publish(tmp, out)
    if not quiet:
        print_report(report, out)
    return report


def _compensated_scores(recipe: Any) -> tuple[Any, list[dict], dict]:
    """The built run (quantized base + compensated adapter), the held-out batches, and their
    NLL under the quantized base without any correction, with the plain-SVD fit of its error
    (LoftQ's) and with EoRA's."""
    from peftune.quant.eora import current_factors, set_factors
    from peftune.train.setup import build_training

    plain_svd: dict = {}
    built = build_training(recipe, quiet=True, plain_svd=plain_svd)
    batches = list(built.val_batches() or [])
    model = built.unwrapped_model
    with model.disable_adapter():
        quantized, tokens = heldout_nll(model, batches)
    compensated, _ = heldout_nll(model, batches)
    eora = current_factors(model)
    set_factors(model, plain_svd)
    svd, _ = heldout_nll(model, batches)
    set_factors(model, eora)
    return built, batches, {"quantized": quantized, "svd": svd, "compensated": compensated,
                            "tokens": tokens}


def _unquantized_nll(recipe: Any, batches: list[dict], *, device: Any) -> float:
    """The held-out NLL of the base as it is on disk (no quantization, no adapter)."""
    from peftune.models import load_model
    from peftune.recipe.quant import QuantSection

    return heldout_nll(load_model(recipe.model, QuantSection(), device=device), batches)[0]


def heldout_nll(model: Any, batches: Sequence[dict]) -> tuple[float, int]:
    """Mean next-token NLL over the target tokens of `batches`, and how many there are."""
    import torch

    from peftune.train.loop import count_targets
    from peftune.train.loss import token_loss_sum

    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            moved = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
            total += float(token_loss_sum(model, moved))
            tokens += count_targets(batch)
    if tokens == 0:
        raise InputError("data.val: the held-out examples have no target token to score")
    return total / tokens, tokens


def _report(recipe: Any, init: dict, scores: dict) -> dict:
    fits = ("unquantized", "quantized", "svd", "compensated")
    ppl = {name: math.exp(scores[name]) for name in fits}
    gap = ppl["quantized"] - ppl["unquantized"]

    def closed(fit: str) -> float | None:  # the share of the gap quantization opened
        return round((ppl["quantized"] - ppl[fit]) / gap, 4) if gap > 0 else None
    return {
        "model": recipe.model.path, "quant": recipe.quant.method, "rank": recipe.adapter.r,
        "target_modules": recipe.adapter.target_modules,
        "damp": recipe.quant.compensation.damp,
        "calibration_examples": recipe.quant.compensation.calibration.examples,
        **{k: v for k, v in init.items() if k != "compensation"},
        "heldout_target_tokens": scores["tokens"],
        "heldout_nll": {name: round(scores[name], 6) for name in fits},
        "heldout_ppl": {name: round(value, 4) for name, value in ppl.items()},
        "ppl_gap_closed": {"eora": closed("compensated"), "svd": closed("svd")},
    }


def print_report(report: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    quant, rank = report["quant"], report["rank"]
    table = Table(title=f"EoRA on {report['model']}: {report['compensated_layers']} layers, "
                        f"{report['calibration_tokens']:,} calibration tokens, "
                        f"{report['compensation_seconds']:.1f} s")
    for column in ("base", "output error", "weight error", "held-out ppl"):
        table.add_column(column, justify="left" if column == "base" else "right")
    ppl = report["heldout_ppl"]
    table.add_row("unquantized", "0", "0", f"{ppl['unquantized']:.4f}")
    table.add_row(quant, f"{report['output_error_before']:.4f}",
                  f"{report['weight_error_before']:.4f}", f"{ppl['quantized']:.4f}")
    table.add_row(f"{quant} + SVD r{rank} (LoftQ's fit)", f"{report['output_error_svd']:.4f}",
                  f"{report['weight_error_svd']:.4f}", f"{ppl['svd']:.4f}")
    table.add_row(f"{quant} + EoRA r{rank}", f"{report['output_error_after']:.4f}",
                  f"{report['weight_error_after']:.4f}", f"{ppl['compensated']:.4f}")
    console = Console()
    console.print(table)
    closed = report["ppl_gap_closed"]
    if closed["eora"] is not None:
        console.print(f"EoRA closes {closed['eora']:.0%} of the perplexity gap that {quant} "
                      f"opened (the plain SVD fit: {closed['svd']:.0%}), on "
                      f"{report['heldout_target_tokens']:,} held-out tokens")
    else:
        console.print(f"{quant} did not raise the held-out perplexity here "
                      f"({report['heldout_target_tokens']:,} tokens): nothing to close")
    console.print("errors are relative: output ||ΔW·X|| / ||W·X|| over the calibration inputs, "
                  "weight ||ΔW|| / ||W||")
    console.print(f"wrote {out}: adapter/ (PEFT LoRA over the {quant} base), recipe.yaml, "
                  f"{REPORT}\n  peftune eval {out} --compare base   |   peftune chat {out}")
