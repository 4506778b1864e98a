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
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
MiB = 1 << 20


def _bench_train():
    """scripts/bench_train.py as a module (its data builders and recipe writer)."""
    spec = importlib.util.spec_from_file_location("bench_train", HERE.parent / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

    bench = _bench_train()
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
                print(f"  {batch} x {length}, checkpointing {ckpt} ...", end="", flush=True)
                began = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "peftune.cli", "train", str(recipe),
                                       "--overwrite", f"train.gradient_checkpointing={ckpt}"],
                                      capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    print(done.stdout[-2000:] + done.stderr[-2000:], file=sys.stderr)
                    return 1
                result = bench.peftune_result(out, 1, args.steps)
                print(f" {time.perf_counter() - began:.0f}s")
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
    sys.exit(main())
