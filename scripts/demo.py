"""The peftune demo (`make demo`): pre-train a tiny model on Python's own text, then LoRA
fine-tune it on Python's unit tests. Offline, CPU, a few minutes; nothing to download.

Steps, each printed with its command and timed; the first failure stops the demo with that
command's exit code:

  1. peftune tiny-model runs/demo/base ...                       (skipped if it exists)
  2. python scripts/build_demo_corpus.py --out runs/demo/data     (skipped if it exists)
  3. peftune train recipes/quickstart/pretrain.yaml --overwrite
  4. peftune train recipes/quickstart/lora.yaml --overwrite

    python scripts/demo.py [--quick] [--workdir DIR]

`--quick` divides the training steps by 4 (for tests and a first look). Paths in the
recipes are relative to the working directory: the repository root unless `--workdir`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BASE = Path("runs/demo/base")
DATA = Path("runs/demo/data")
CORPUS_FILES = ("pretrain.jsonl", "tests_train.jsonl", "tests_val.jsonl", "instruct_train.jsonl")
PRETRAIN = REPO / "recipes/quickstart/pretrain.yaml"
LORA = REPO / "recipes/quickstart/lora.yaml"
QLORA = REPO / "recipes/quickstart/qlora.yaml"
# ~2.5 M parameters: big enough to learn Python's surface in a few hundred steps, small
# enough for ~0.5 s per step of 8 x 512 tokens on 2 CPU cores.
TINY_MODEL = ("--hidden-size", "256", "--layers", "4", "--heads", "4", "--seed", "0")
QUICK_FACTOR = 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_FACTOR}x fewer training steps (tests, a first look)")
    parser.add_argument("--workdir", type=Path, default=REPO,
                        help="directory the demo runs in (runs/demo/ is created there)")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    peftune = [sys.executable, "-m", "peftune.cli"]
    steps = [
        ("build a tiny random base model",
         [*peftune, "tiny-model", str(BASE), *TINY_MODEL],
         BASE if (workdir / BASE / "config.json").is_file() else None),
        ("build the demo corpus from Python's own sources and docs",
         [sys.executable, _shown(REPO / "scripts/build_demo_corpus.py", workdir), "--out", str(DATA)],
         DATA if all((workdir / DATA / name).is_file() for name in CORPUS_FILES) else None),
        ("pre-train the base model on prose and library code (full fine-tuning)",
         [*peftune, "train", _shown(PRETRAIN, workdir), *_quick(PRETRAIN, args.quick), "--overwrite"],
         None),
        ("LoRA fine-tune the pre-trained model on the stdlib's unit tests",
         [*peftune, "train", _shown(LORA, workdir), *_quick(LORA, args.quick), "--overwrite"],
         None),
    ]

    env = dict(os.environ)
    # Works from a checkout without `pip install -e .`, and never reaches for the hub.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")

    start = time.perf_counter()
    for number, (title, command, existing) in enumerate(steps, 1):
        print(f"\n=== [{number}/{len(steps)}] {title}", flush=True)
        print(f"$ {_display(command)}", flush=True)
        if existing is not None:
            print(f"skipped: {existing} already exists (`make clean` removes runs/demo/)")
            continue
        step_start = time.perf_counter()
        code = subprocess.call(command, cwd=workdir, env=env)
        if code != 0:
            print(f"\ndemo: step {number} failed with exit code {code}: {_display(command)}",
                  file=sys.stderr)
            return code
        print(f"--- step {number} done in {_duration(time.perf_counter() - step_start)}", flush=True)

    report(workdir, time.perf_counter() - start)
    return 0


def report(workdir: Path, seconds: float) -> None:
    """Where the results are, the losses they reached, and what to try next."""
    pretrain_dir = workdir / _recipe_output(PRETRAIN)
    lora_dir = workdir / _recipe_output(LORA)
    pretrain, lora = _read_summary(pretrain_dir), _read_summary(lora_dir)
    val = [r["val_loss"] for r in _read_metrics(lora_dir) if "val_loss" in r]

    print(f"\n=== demo done in {_duration(seconds)}")
    if pretrain.get("final_loss") is not None:
        print(f"pre-training  final train loss {pretrain['final_loss']:.3f}")
    if lora.get("final_loss") is not None:
        line = f"LoRA          final train loss {lora['final_loss']:.3f}"
        if lora.get("final_val_loss") is not None:
            line += f", val loss {lora['final_val_loss']:.3f}"
            if len(val) > 1:
                line += f" (first eval {val[0]:.3f})"
        print(line)
    rows = [
        ("adapter", lora.get("artifact") or lora_dir / "adapter"),
        ("metrics", lora_dir / "metrics.jsonl"),
        ("plot", lora.get("plot") or lora_dir / "loss.png"),
        ("summary", lora_dir / "summary.json"),
        ("base", pretrain.get("artifact") or pretrain_dir / "model"),
    ]
    for name, path in rows:
        print(f"  {name:<8} {_shown(Path(workdir, path), workdir)}")
    print("\nnext:")
    print(f"  peftune validate {_shown(QLORA, workdir)}              # what a recipe resolves to")
    print(f"  peftune train {_shown(QLORA, workdir)} --overwrite     # the same fine-tune over a 4-bit base")
    print("  recipes/models/ has LoRA and QLoRA recipes for Qwen2.5 and Llama 3.2 (they need the hub)")


def _quick(recipe: Path, quick: bool) -> list[str]:
    """Overrides that make a recipe's run QUICK_FACTOR times shorter."""
    if not quick:
        return []
    train = (yaml.safe_load(recipe.read_text()) or {}).get("train") or {}
    overrides = []
    if train.get("max_steps"):
        overrides.append(f"train.max_steps={max(1, train['max_steps'] // QUICK_FACTOR)}")
    else:
        overrides.append(f"train.epochs={train.get('epochs', 1.0) / QUICK_FACTOR}")
    if train.get("eval_every"):
        overrides.append(f"train.eval_every={max(1, train['eval_every'] // QUICK_FACTOR)}")
    return overrides


def _recipe_output(recipe: Path) -> Path:
    return Path((yaml.safe_load(recipe.read_text()).get("output") or {}).get("dir", "runs/my-run"))


def _read_summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _read_metrics(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError):
        return []


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
