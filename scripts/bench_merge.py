"""Benchmark: peak RSS and time of `peftune merge` of one LoRA into a sharded base
against peft's `merge_and_unload()` + `save_pretrained`, on the same local model and adapter.

The model (Llama-shaped, random weights, fp32, a few hundred MB) is saved in >= 4 shards and
given a LoRA (r=16 on every linear, random B so the adapter changes every module). Each side
runs in its own fresh Python process; peak RSS is that process's VmHWM (`benchlib.run_python`).
"Above imports" is the peak minus a process that only imports torch, transformers and peft, i.e.
the memory the merge itself holds; the targets (peak RSS above imports <= 0.5x peft's, wall time
<= 1.0x peft's) are judged on that and on wall time. Both outputs are then loaded and compared,
so a fast wrong merge cannot pass.

    python scripts/bench_merge.py [--hidden 1024] [--layers 16] [--shard-size 120MB] [--rounds 2]

Peak RSS is the largest over the rounds, time the fastest round of each side (the order
alternates between rounds).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import benchlib

IMPORTS = """
import torch, transformers, peft, safetensors
from transformers import AutoModelForCausalLM
from peft import PeftModel
"""
PEFT = """
import sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out, size = sys.argv[1:5]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
model.merge_and_unload().save_pretrained(out, max_shard_size=size)
"""
PEFTUNE = """
import sys
from peftune.cli import main
base, adapter, out, size = sys.argv[1:5]
sys.argv = ["peftune", "merge", "--base", base, "--adapter", adapter, "--out", out,
            "--shard-size", size, "--quiet"]
try:
    main()
except SystemExit as done:
    if done.code:
        raise
"""
TARGET_RSS, TARGET_TIME = 0.5, 1.0


def measure(code: str, base: Path, adapter: Path, out: Path,
            shard_size: str) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of a fresh Python process running `code` with the
    arguments BASE ADAPTER OUT SHARD_SIZE (its log beside OUT)."""
    run = benchlib.run_python(code, str(base), str(adapter), str(out), shard_size,
                              log=out.with_name(out.name + ".log"),
                              name=f"the process writing {out.name}")
    return run["peak_rss_bytes"] / benchlib.MiB, run["wall_seconds"]


def build(root: Path, *, hidden: int, layers: int, shard_size: str) -> tuple[Path, Path, int, float]:
    """The benchmark's base (ROOT/base, saved in shards of `shard_size`, with the tokenizer and
    chat template) and its LoRA (ROOT/adapter); also used by scripts/merge_memory.py. Returns
    (base, adapter, number of shards, weights' MiB)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peftune.models import build_tiny_model

    build_tiny_model(root / "single", hidden_size=hidden, layers=layers, heads=8)
    model = AutoModelForCausalLM.from_pretrained(root / "single", dtype=torch.float32)
    base = root / "base"
    model.save_pretrained(base, max_shard_size=shard_size)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (root / "single" / name).is_file():
            (base / name).write_bytes((root / "single" / name).read_bytes())
    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.01
    peft_model.save_pretrained(root / "adapter")
    shards = len(list(base.glob("*.safetensors")))
    size_mib = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20
    return base, root / "adapter", shards, size_mib


def same_weights(a: Path, b: Path) -> float:
    """Max |difference| between two model directories' tensors (read one at a time)."""
    from peftune.merge.writer import iter_base_tensors

    other = dict(iter_base_tensors(b))
    worst = 0.0
    for name, tensor in iter_base_tensors(a):
        if name not in other:
            if name == "lm_head.weight":  # tied: one side may leave it out
                continue
            raise SystemExit(f"{name} missing from {b}")
        worst = max(worst, float((tensor.float() - other[name].float()).abs().max()))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--shard-size", default="120MB")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, adapter, shards, size_mib = build(root, hidden=args.hidden, layers=args.layers,
                                                shard_size=args.shard_size)
        if shards < 4:
            raise SystemExit(f"the base has {shards} shards; use a smaller --shard-size")
        floor, _ = measure(IMPORTS, base, adapter, root / "unused", args.shard_size)
        runs: dict[str, list[tuple[float, float]]] = {"peft": [], "peftune": []}
        for i in range(args.rounds):  # alternate the order: a shared machine's load drifts
            for label in (("peft", "peftune") if i % 2 == 0 else ("peftune", "peft")):
                runs[label].append(measure(PEFT if label == "peft" else PEFTUNE, base, adapter,
                                           root / f"{label}-{i}", args.shard_size))
        error = same_weights(root / "peftune-0", root / "peft-0")
    # peak RSS: the largest over rounds; time: the fastest (the least disturbed) round
    peft_rss, peft_time = max(r for r, _ in runs["peft"]), min(t for _, t in runs["peft"])
    ours_rss, ours_time = max(r for r, _ in runs["peftune"]), min(t for _, t in runs["peftune"])
    rss_ratio = (ours_rss - floor) / (peft_rss - floor)
    time_ratio = ours_time / peft_time
    print(f"{args.rounds} rounds each; base: hidden {args.hidden}, {args.layers} layers, {size_mib:.1f} MiB fp32 in {shards} "
          f"shards; LoRA r=16 on every linear")
    print(f"  imports only (torch, transformers, peft)  peak RSS {floor:8.1f} MiB")
    print(f"  peft merge_and_unload + save_pretrained   peak RSS {peft_rss:8.1f} MiB "
          f"({peft_rss - floor:7.1f} above imports)  {peft_time:6.1f}s")
    print(f"  peftune merge (streaming + verification)  peak RSS {ours_rss:8.1f} MiB "
          f"({ours_rss - floor:7.1f} above imports)  {ours_time:6.1f}s")
    print(f"  same merged weights: max |peftune - peft| = {error:.3g}")
    print(f"peak RSS above imports: {rss_ratio:.2f}x peft (target <= {TARGET_RSS}x; whole "
          f"process {ours_rss / peft_rss:.2f}x); time {time_ratio:.2f}x peft (target <= "
          f"{TARGET_TIME}x)")
    ok = rss_ratio <= TARGET_RSS and time_ratio <= TARGET_TIME and error < 1e-4
    print(f"merge bench: {benchlib.verdict_word(ok)}")
    return 0


if __name__ == "__main__":
    benchlib.run_main(main)
