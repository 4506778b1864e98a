"""Sizing table for docs/memory.md: peak RSS and tokens/s of peftune on the real model
against micro-batch x length, with and without activation checkpointing.

Each cell is one `peftune train` process (LoRA r 16 all-linear, fp32, full-length rows of
the stdlib's text, so every row holds `length` real tokens), `--steps` optimizer steps, the
first left out of the steady throughput. Prints a Markdown table and writes JSON.

    python scripts/bench_sizing.py [--cells 1x512,4x512,8x512,4x1024] [--steps 3]
                                   [--model NAME|PATH] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import bench_train as bench  # its data builders, recipe writer and result reader
import benchlib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default="1x512,4x512,8x512,4x1024",
                        help="comma-separated BATCHxLENGTH cells")
    parser.add_argument("--checkpointing", default="false,true",
                        help="comma-separated train.gradient_checkpointing values")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/bench_sizing.json"))
    args = parser.parse_args(argv)
    try:
        cells = [tuple(int(x) for x in cell.split("x")) for cell in args.cells.split(",")]
    except ValueError:
        parser.error(f"--cells: expected BATCHxLENGTH items, e.g. 4x512; got {args.cells}")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first is left out of tokens/s)")

    from peftune.models import load_tokenizer, resolve_model_path

    model = args.model or bench.REAL_MODEL
    tokenizer = load_tokenizer(resolve_model_path(model))
    work = Path(tempfile.mkdtemp(prefix="peftune-sizing-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    try:
        longest = max(length for _, length in cells)
        data = work / "full.jsonl"
        need = max(batch * length for batch, length in cells) * (args.steps + 1) * 2
        bench.build_text(data, tokenizer, tokens=need, low=longest + 64, high=longest + 64, seed=0)
        for batch, length in cells:
            for ckpt in args.checkpointing.split(","):
                recipe = work / f"{batch}x{length}-{ckpt}.yaml"
                out = work / f"{batch}x{length}-{ckpt}"
                bench.write_recipe(recipe, model=model, data=data, out=out, shape="full",
                                   steps=args.steps, batch_size=batch, max_length=length,
                                   log_every=1)
                benchlib.run_child(f"{batch} x {length}, checkpointing {ckpt}",
                                   [sys.executable, "-m", "peftune.cli", "train", str(recipe),
                                    "--overwrite", f"train.gradient_checkpointing={ckpt}"],
                                   log=work / f"{batch}x{length}-{ckpt}.log", env=env, width=0,
                                   waiting="...", describe=lambda run: f" {run.wall_seconds:.0f}s")
                result = bench.peftune_result(out, 1, args.steps)
                rows.append({"batch": batch, "length": length, "checkpointing": ckpt,
                             "peak_rss_bytes": result["peak_rss_bytes"],
                             "steady_tokens_per_s": result["steady_tokens_per_s"]})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{model}, LoRA r 16 all-linear, fp32, {os.cpu_count()} CPUs, "
          f"{args.steps} steps (the first left out of tokens/s)\n")
    print("| micro-batch x length | checkpointing | peak RSS | tokens/s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} x {r['length']} | {r['checkpointing']} | "
              f"{r['peak_rss_bytes'] / (1 << 30):.2f} GB | {r['steady_tokens_per_s']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": model, "steps": args.steps, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    benchlib.run_main(main)
