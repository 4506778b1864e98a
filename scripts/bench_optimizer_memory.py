"""Optimizer memory of full fine-tuning (`make bench`): AdamW vs LISA vs GaLore vs GaLore 8-bit.

One tiny Llama-style model (hidden 256, 4 layers by default), the same random batches, the
same number of optimizer steps; each variant in its own process so that peak RSS is its own:

  adamw        torch AdamW over every parameter (peftune's `adapter.method: full`)
  lisa         the same AdamW under peftune's LISA sampler (train.strategy lisa, --lisa-layers
               of the decoder layers active, resampled every 2 steps)
  galore       galore-torch GaLoreAdamW as peftune builds it (train.strategy galore, --rank)
  galore8bit   GaLoreAdamW8bit (bitsandbytes); CUDA only, reported as skipped on CPU

Figures: the largest optimizer state after any step (every tensor in optimizer.state,
GaLore's projection matrices included; LISA's right after a step, before a resample releases
it) and its ratio to AdamW's; the process's peak RSS (ru_maxrss) and its rise over the RSS
with the model loaded; on CUDA also the peak allocated GPU memory; first and last
loss (a sanity check that each variant trains).

    python scripts/bench_optimizer_memory.py [--hidden 256] [--layers 4] [--steps 6]
                                             [--rank 64] [--lisa-layers 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import benchlib
from benchlib import MiB

VARIANTS = ("adamw", "lisa", "galore", "galore8bit")


def run_variant(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from peftune.recipe.schema import TrainSection
    from peftune.train.optim import build_optimizer
    from peftune.train.strategies import LisaSampler, optimizer_state_bytes

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.variant == "galore8bit" and device.type != "cuda":
        return {"variant": args.variant, "skipped": "GaLoreAdamW8bit needs CUDA "
                "(galore-torch calls torch.cuda.synchronize() every step)"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    baseline_rss = benchlib.current_rss_bytes()
    galore = {"name": "galore", "rank": args.rank, "update_proj_gap": 200}
    if args.variant.startswith("galore"):
        cfg = TrainSection(lr=1e-3, strategy=galore,
                           optimizer="adamw8bit" if args.variant == "galore8bit" else "adamw")
        optimizer = build_optimizer(model, cfg)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    after = None
    if args.variant == "lisa":
        after = LisaSampler(model, optimizer, layers=args.lisa_layers, interval=2, seed=0).after_step
    losses, state_bytes = [], 0
    generator = torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        ids = torch.randint(3, model.config.vocab_size, (4, 128), generator=generator).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        state_bytes = max(state_bytes, optimizer_state_bytes(optimizer))
        if after is not None:
            after(model, step)
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    peak_rss = benchlib.peak_rss_bytes()
    out = {"variant": args.variant, "state_bytes": state_bytes,
           "peak_rss_bytes": peak_rss, "rss_rise_bytes": peak_rss - baseline_rss,
           "first_loss": losses[0], "last_loss": losses[-1],
           "parameters": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=64, help="GaLore's rank")
    parser.add_argument("--lisa-layers", type=int, default=1, help="LISA's active layers")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/bench_optimizer_memory.json"))
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one child
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0

    from peftune.models import build_tiny_model

    with tempfile.TemporaryDirectory() as work:
        model = build_tiny_model(Path(work) / "tiny", hidden_size=args.hidden,
                                 layers=args.layers, heads=4, seed=0)
        results = []
        for variant in VARIANTS:
            log = Path(work) / f"{variant}.log"
            command = [sys.executable, __file__, "--variant", variant, "--model", str(model),
                       "--steps", str(args.steps), "--rank", str(args.rank),
                       "--lisa-layers", str(args.lisa_layers)]
            benchlib.run_child(variant, command, log=log, quiet=True)
            lines = log.read_text().splitlines()  # the result is the last JSON line printed
            results.append(json.loads(next(line for line in reversed(lines)
                                           if line.startswith("{"))))
    adamw = results[0]
    print(f"tiny Llama: hidden {args.hidden}, {args.layers} layers, {adamw['parameters']:,} "
          f"parameters; {args.steps} steps; GaLore rank {args.rank}; LISA "
          f"{args.lisa_layers}/{args.layers} layers")
    print(f"{'variant':<11} {'state MiB':>10} {'vs adamw':>9} {'peak RSS MiB':>13} "
          f"{'RSS rise MiB':>13} {'loss first->last':>17}")
    for r in results:
        if "skipped" in r:
            print(f"{r['variant']:<11} skipped: {r['skipped']}")
            continue
        r["state_ratio"] = r["state_bytes"] / adamw["state_bytes"]
        r["rss_rise_ratio"] = r["rss_rise_bytes"] / max(adamw["rss_rise_bytes"], 1)
        print(f"{r['variant']:<11} {r['state_bytes'] / MiB:>10.2f} {r['state_ratio']:>9.3f} "
              f"{r['peak_rss_bytes'] / MiB:>13.1f} {r['rss_rise_bytes'] / MiB:>13.1f} "
              f"{r['first_loss']:>8.3f}->{r['last_loss']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    benchlib.run_main(main)
