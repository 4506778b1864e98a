"""DPO against LN-DPO on the real model, in miniature: the measurements of docs/preference.md.

The claim under test ("The Hitchhiker's Guide to Human Alignment with *PO"): DPO's answers
stay long, close to the SFT model's, while LN-DPO (DPO with each log-ratio divided by the
response length) answers more concisely at no loss of quality. For each pair set of
scripts/build_preference_task.py (`--sets`, default: concise correct), this trains
recipes/preference/dpo.yaml once with `dpo` and once with `ln-dpo` (same steps, seed and
data), evaluates both against the base with recipes/preference/eval.yaml (held-out reward
accuracy; length and correctness of greedy answers to the held-out questions), and prints
one Markdown table per set. Every step is a `peftune` command, printed before it runs.

    python scripts/preference_experiment.py [--sets concise correct] [--steps 36] [--workdir .]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes/preference/dpo.yaml"
EVAL = REPO / "recipes/preference/eval.yaml"
OBJECTIVES = ("dpo", "ln-dpo")
PAIRS_TASK, ANSWERS_TASK = "held-out-pairs", "held-out-answers"


def run(command: list[str], cwd: Path) -> None:
    print("$ " + shlex.join(command), flush=True)
    began = time.perf_counter()
    done = subprocess.run(command, cwd=cwd)
    if done.returncode != 0:
        raise SystemExit(done.returncode)
    print(f"  ({time.perf_counter() - began:.0f}s)", flush=True)


def metric(report: dict, model: int, task: str, name: str) -> float | None:
    found = report["models"][model]["tasks"][task]["metrics"].get(name)
    return None if found is None else found["value"]


def table(reports: dict[str, dict]) -> str:
    """Base (from the first report's --compare base), then each objective's run. Reward
    margins are left out: each is scaled by its objective's beta, so only their sign (the
    accuracy) compares across objectives."""
    rows = [("base", next(iter(reports.values())), 1)] + [(name, rep, 0)
                                                          for name, rep in reports.items()]
    lines = ["| model | held-out reward accuracy | held-out log-prob accuracy | mean answer "
             "tokens | answers naming the right module |", "|---|---|---|---|---|"]

    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for name, report, index in rows:
        lines.append("| " + " | ".join([
            name,
            cell(metric(report, index, PAIRS_TASK, "reward_accuracy"), ".1%"),
            cell(metric(report, index, PAIRS_TASK, "logp_accuracy"), ".1%"),
            cell(metric(report, index, ANSWERS_TASK, "answer_tokens"), ".1f"),
            cell(metric(report, index, ANSWERS_TASK, "contains"), ".1%")]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["concise", "correct"],
                        choices=["concise", "verbose", "correct"])
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--workdir", type=Path, default=REPO)
    parser.add_argument("--tables-only", action="store_true",
                        help="print the tables of runs already evaluated, train nothing")
    args = parser.parse_args(argv)
    work = args.workdir.resolve()
    py, peftune = sys.executable, [sys.executable, "-m", "peftune.cli"]
    if not (work / "runs/demo/data/heldout.jsonl").is_file():
        run([py, str(REPO / "scripts/build_demo_task.py"), "--out", "runs/demo/data"], work)
    results = {}
    for pairs in args.sets:
        if args.tables_only:
            results[pairs] = table({o: json.loads((work / f"runs/preference/{pairs}-{o}/eval/"
                                                           "report.json").read_text())
                                    for o in OBJECTIVES})
            continue
        data = f"runs/preference/{pairs}"
        run([py, str(REPO / "scripts/build_preference_task.py"), "--task", "runs/demo/data",
             "--out", data, "--prefer", pairs], work)
        config = yaml.safe_load(EVAL.read_text())  # the eval, on this set's held-out pairs
        config["eval"]["tasks"][0]["data"] = f"{data}/heldout.jsonl"
        eval_file = work / f"runs/preference/{pairs}-eval.yaml"
        eval_file.write_text(yaml.safe_dump(config, sort_keys=False))
        reports = {}
        for objective in OBJECTIVES:
            out = f"runs/preference/{pairs}-{objective}"
            run([*peftune, "train", str(RECIPE), f"data.train={data}/train.jsonl",
                 f"data.val={data}/heldout.jsonl", f"train.objective.name={objective}",
                 f"train.max_steps={args.steps}", f"output.dir={out}", "--overwrite"], work)
            run([*peftune, "eval", out, "--config", str(eval_file), "--compare", "base",
                 "--overwrite", "--quiet"], work)
            reports[objective] = json.loads((work / out / "eval" / "report.json").read_text())
        results[pairs] = table(reports)
    for pairs, text in results.items():
        print(f"\n### prefer {pairs}\n\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
