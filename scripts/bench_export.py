"""Benchmark: `peftune export RUN --outtype f16` against `peftune merge RUN` of the same run
(SmolLM2-135M-Instruct, a LoRA the script trains first for a few steps).

Both take the run directory alone, merge the adapter into the base and verify the result:
merge writes a Hugging Face directory (fp32, the base's dtype), export merges in f16 and
writes one GGUF file, then reads it back (gguf's reader, transformers' GGUF loader). Each
command runs in its own fresh Python process; peak RSS is that process's VmHWM
(`benchlib.run_python`), time its wall time. Targets: export within 2x merge's time and 1.5x
its peak RSS. Rounds alternate the order (merge, export, export, merge, ...); time is the
fastest round of each, peak RSS the highest.

    python scripts/bench_export.py [--rounds 2] [--steps 3] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import benchlib

REAL_MODEL = "smollm2-135m-instruct"
TARGET_TIME, TARGET_RSS = 2.0, 1.5
CLI = """
import sys
from peftune.cli import main
sys.argv = ["peftune", *sys.argv[1:]]
try:
    main()
except SystemExit as done:
    if done.code:
        raise
"""
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega").split()


def train_run(work: Path, *, model: str, steps: int) -> Path:
    """A short LoRA run (r 8 on every linear) of `model` on generated text: RUN/adapter."""
    rng = random.Random(0)
    rows = []
    for _ in range(32):
        start = rng.randrange(len(WORDS))
        rows.append({"text": " ".join(WORDS[(start + i) % len(WORDS)]
                                      for i in range(rng.randint(8, 40)))})
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = work / "run"
    recipe = work / "recipe.yaml"
    recipe.write_text(json.dumps({  # JSON is YAML
        "model": {"path": model, "dtype": "float32"},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
        "data": {"train": str(data), "max_length": 64},
        "train": {"max_steps": steps, "batch_size": 2, "lr": 5e-3, "log_every": 1,
                  "warmup_ratio": 0.0, "scheduler": "constant"},
        "output": {"dir": str(run)},
    }))
    benchlib.run_child(f"training a LoRA ({steps} steps)", [
        *_python(), "train", str(recipe)], log=work / "train.log", width=30)
    return run


def _python() -> list[str]:
    import sys

    return [sys.executable, "-c", CLI]


def _n(work: Path) -> int:
    return len(list(work.glob("*.log")))


def measure(name: str, args: list[str], log: Path) -> dict:
    run = benchlib.run_python(CLI, *args, log=log, name=name)
    return {**run, "log": str(log), "load_after": benchlib.load_average()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=REAL_MODEL)
    parser.add_argument("--steps", type=int, default=3, help="training steps of the LoRA")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/bench_export.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = train_run(work, model=args.model, steps=args.steps)

        def merge(tag: str) -> dict:
            return measure("peftune merge", ["merge", str(run), "--out", str(work / "merged"),
                                             "--overwrite"], work / f"merge{_n(work)}.log")

        def export(tag: str) -> dict:
            return measure("peftune export", ["export", str(run), "--outtype", "f16", "--out",
                                              str(work / "export.gguf"), "--overwrite"],
                           work / f"export{_n(work)}.log")

        print(f"  timing peftune merge and peftune export, {args.rounds} rounds ...", flush=True)
        best = benchlib.interleaved({"merge": (merge, lambda r: r["wall_seconds"]),
                                     "export": (export, lambda r: r["wall_seconds"])},
                                    args.rounds)
        verified = [line for line in Path(best["export"]["log"]).read_text().splitlines()
                    if line.startswith("verified:")]
        size = (work / "export.gguf").stat().st_size
    merge_s, export_s = best["merge"]["wall_seconds"], best["export"]["wall_seconds"]
    merge_rss, export_rss = best["merge"]["peak_rss_bytes"], best["export"]["peak_rss_bytes"]
    verdicts = [
        benchlib.verdict("export / merge time", export_s / merge_s, "<=", TARGET_TIME),
        benchlib.verdict("export / merge peak RSS", export_rss / merge_rss, "<=", TARGET_RSS),
    ]
    print(f"\nmodel {args.model}; LoRA r 8 on every linear, {args.steps} training steps; "
          f"{args.rounds} rounds, fastest time and highest peak RSS of each")
    for name, label in (("merge", "peftune merge RUN (HF dir, fp32)"),
                        ("export", "peftune export RUN --outtype f16")):
        r = best[name]
        print(f"  {label:<36} {r['wall_seconds']:6.1f}s (rounds: "
              f"{', '.join(f'{s:.1f}' for s in r['repeat_seconds'])})  peak RSS "
              f"{r['peak_rss_bytes'] / benchlib.MiB:7.0f} MiB")
    print(f"  export wrote {size / 1e6:.1f} MB; {verified[0] if verified else 'no verified line'}")
    for item, target in zip(verdicts, (TARGET_TIME, TARGET_RSS), strict=True):
        print(benchlib.verdict_line(item, width=26, value=f"{item['value']:5.2f}x",
                                    target=f"<= {target:g}x", missed="MISS"))
    loads = [best[n]["load_after"] for n in best]
    note = benchlib.busy_note(loads, limit=2.5)
    if note:
        print(f"note: {note}")
    report = {"model": args.model, "steps": args.steps, "rounds": args.rounds,
              "systems": {n: {k: v for k, v in r.items() if k != "log"} for n, r in best.items()},
              "verdicts": verdicts, "gguf_bytes": size,
              "elapsed_seconds": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    benchlib.run_main(main)
