"""Build preference pairs for the demo task: no downloads, standard library only.

Reads the demo task (scripts/build_demo_task.py: chat rows asking which standard-library
module defines a function, "Answer with the module name only.", with `module` and `function`
fields) and writes `data.format: preference` rows: `prompt` (the user's message), `chosen`
and `rejected` (strings), plus `module` and `function`. Three sets, by `--prefer`:

  concise      chosen: the module name alone; rejected: a padded, verbose answer naming the
               same module (both right, one as asked)
  verbose      the same pairs with the roles reversed
  correct      chosen: the right module, rejected: another module of the task; each side
               is concise or verbose by a coin flip of its own, so length says nothing about
               which is preferred (the setting in which DPO is said to drift longer)

The verbose answers come from a few fixed templates, picked by a seeded draw. Writes
`train.jsonl` and `heldout.jsonl` (from the task's held-out questions) into `--out`.

    python scripts/build_preference_task.py --task runs/demo/data --out runs/preference/concise --prefer concise
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling corpus builder
from build_demo_corpus import write_jsonl  # noqa: E402 - atomic JSONL, stdlib only

VERBOSE = (
    "The function `{f}` is defined in the `{m}` module of the Python standard library. You "
    "can import it with `import {m}` and call it as `{m}.{f}(...)`. Let me know if you have "
    "any other questions!",
    "Great question! `{f}` lives in the `{m}` module, which is part of Python's standard "
    "library, so there is nothing extra to install: write `from {m} import {f}` and you are "
    "ready to use it.",
    "That would be the `{m}` module. In the Python standard library, `{f}` is provided by "
    "`{m}`; importing `{m}` gives you access to it together with the other tools the module "
    "offers.",
)
PREFERENCES = ("concise", "verbose", "correct")


def answer(module: str, function: str, *, verbose: bool, rng: random.Random) -> str:
    return rng.choice(VERBOSE).format(m=module, f=function) if verbose else module


def pairs_of(rows: list[dict], prefer: str, *, seed: int) -> list[dict]:
    """One pair per question of `rows` (demo-task chat rows)."""
    rng = random.Random(seed)
    modules = sorted({row["module"] for row in rows})
    out = []
    for row in rows:
        question = next(m["content"] for m in row["messages"] if m["role"] == "user")
        module, function = row["module"], row["function"]
        if prefer == "correct":
            wrong = rng.choice([m for m in modules if m != module])
            chosen = answer(module, function, verbose=rng.random() < 0.5, rng=rng)
            rejected = answer(wrong, function, verbose=rng.random() < 0.5, rng=rng)
        else:
            concise = answer(module, function, verbose=False, rng=rng)
            verbose = answer(module, function, verbose=True, rng=rng)
            chosen, rejected = (concise, verbose) if prefer == "concise" else (verbose, concise)
        out.append({"prompt": [{"role": "user", "content": question}], "chosen": chosen,
                    "rejected": rejected, "module": module, "function": function})
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", type=Path, required=True,
                        help="the demo task's directory (train.jsonl, heldout.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--prefer", choices=PREFERENCES, default="concise")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sources = {name: args.task / f"{name}.jsonl" for name in ("train", "heldout")}
    missing = [str(path) for path in sources.values() if not path.is_file()]
    if missing:
        print(f"error: --task: {missing[0]} not found; build the demo task first: python "
              f"scripts/build_demo_task.py --out {args.task}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for offset, (name, path) in enumerate(sources.items()):
        pairs = pairs_of(read_jsonl(path), args.prefer, seed=args.seed * 2 + offset)
        write_jsonl(args.out / f"{name}.jsonl", pairs)
        print(f"{name}.jsonl  {len(pairs)} pairs (prefer {args.prefer})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
