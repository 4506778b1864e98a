"""The export's model card: `README.md` beside the GGUF files `peftune export` wrote.

One card per directory, listing every GGUF file exported there (an f16 and a q4_0 of one run
share `RUN/export/`): its type, size and verification figures, where it came from, how to
run it with llama.cpp, Ollama and transformers, and, for a training run, what the run's own
card says of the base, the method and the results. What each export measured is kept in
`.peftune-export.json` beside it, so the card is rewritten whole at every export; a file
deleted since drops out. A README.md that peftune did not write is left alone (the export
says so).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from peftune.train.card import base_lines, number, peftune_version, results_lines

CARD = "README.md"
LEDGER = ".peftune-export.json"
MARKER = "<!-- written by peftune export: rewritten at each export into this directory -->"


def write_export_card(report: dict, *, source: str, run: Path | None,
                      adapter: str | None) -> Path | None:
    """Record this export in the directory's ledger and rewrite its card; None (nothing
    written) where the directory holds a README.md of someone else's."""
    out = Path(report["out"])
    card, ledger_path = out.parent / CARD, out.parent / LEDGER
    if card.is_file() and not card.read_text(errors="replace").startswith(MARKER):
        return None
    ledger = _read_ledger(ledger_path)
    check = report["verification"]
    ledger[out.name] = {
        "outtype": report["outtype"], "bytes": report["bytes"],
        "architecture": report["architecture"], "source": source, "run": str(run) if run else None,
        "adapter": adapter, "modelfile": Path(report["modelfile"]).name if report["modelfile"] else None,
        "relative_logit_error": check["relative_logit_error"], "bound": check["bound"],
        "rounding_relative_logit_error": check["rounding_relative_logit_error"],
        "top1_agreement": check["top1_agreement"], "probes": check["probes"],
        "exported": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "peftune": peftune_version()}
    ledger = {name: facts for name, facts in ledger.items() if (out.parent / name).is_file()}
    for path, text in ((ledger_path, json.dumps(ledger, indent=2) + "\n"),
                       (card, export_card(out.parent, ledger, latest=out.name))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return card


def _read_ledger(path: Path) -> dict:
    try:
        ledger = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return ledger if isinstance(ledger, dict) else {}


def export_card(directory: Path, ledger: dict, *, latest: str) -> str:
    facts = ledger[latest]
    run = Path(facts["run"]) if facts.get("run") else None
    title = run.name if run else Path(facts["source"]).name
    if run:
        origin = f"the training run `{run}`"
    elif facts.get("adapter"):
        origin = f"the model `{facts['source']}` with the adapter `{facts['adapter']}` merged in"
    else:
        origin = f"the model `{facts['source']}`"
    lines = [MARKER, f"# {title} (GGUF)", "",
             f"GGUF files for llama.cpp, Ollama and transformers, exported from {origin} by "
             f"peftune {facts['peftune']}. Each file was read back after it was written: its "
             "metadata with gguf's reader, its logits with transformers' GGUF loader against "
             "the merged model.", "",
             "## Files", "",
             "| file | type | size | logit error as stored (bound) | rounding error | same next "
             "token | exported |", "|---|---|---|---|---|---|---|"]
    for name, item in ledger.items():
        rounding = item.get("rounding_relative_logit_error")
        lines.append(f"| `{name}` | {item['outtype']} | {item['bytes'] / 1e6:,.1f} MB | "
                     f"{number(item['relative_logit_error'])} ({number(item['bound'])}) | "
                     f"{number(rounding) if rounding else '-'} | "
                     f"{item['top1_agreement']:.0%} | {item['exported']} |")
    lines += ["", "The logit error compares the file with the merged model rounded as the file "
              "stores it; the rounding error, the rounded model with the unrounded one "
              f"(relative, on {facts['probes']} probe inputs).", "", "## Run it", "",
              "```bash", f"llama-cli -m {directory / latest} -cnv      # llama.cpp, with the "
              "chat template in the file"]
    modelfile = facts.get("modelfile")
    if modelfile:
        from peftune.export.modelfile import ollama_name

        name = ollama_name(Path(latest))
        lines += [f"ollama create {name} -f {directory / modelfile}   # Ollama", f"ollama run {name}"]
    lines += ["```", "", "```python", "from transformers import AutoModelForCausalLM", "",
              f"model = AutoModelForCausalLM.from_pretrained(\"{directory}\", "
              f"gguf_file=\"{latest}\")", "```", ""]
    if run is not None:
        lines += _run_lines(run)
    return "\n".join(lines)


def _run_lines(run: Path) -> list[str]:
    """What the run's own card says of the base, the method and the results."""
    try:
        summary = json.loads((run / "summary.json").read_text())
        import yaml

        recipe = yaml.safe_load((run / "recipe.yaml").read_text()) or {}
    except (OSError, ValueError):
        return []
    adapter = recipe.get("adapter", {})
    quant = recipe.get("quant", {}).get("method", "none")
    return ["## Training", "",
            f"A `{adapter.get('method', summary.get('method'))}` fine-tune; the run's own card, "
            f"with the data and the resolved recipe: `{run / 'README.md'}`.", "",
            *base_lines(recipe.get("model", {}), quant, summary.get("model_source")),
            *results_lines(summary)]
