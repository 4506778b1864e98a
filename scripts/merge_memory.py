"""Peak RSS of merging a LoRA into a sharded base: peftune's streaming writer alone, the whole
`peftune merge` (which also loads the model to verify logits), and peft's
`merge_and_unload()` + `save_pretrained`. Each runs in its own process.

    python scripts/merge_memory.py [--hidden 512] [--layers 8] [--shard-size 10MB]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STREAM = """
import sys
from pathlib import Path
from peftune.merge.deltas import load_lora_adapter
from peftune.merge.runner import _lazy_deltas
from peftune.merge.writer import parse_size, write_merged
base, adapter, out, size = map(Path, sys.argv[1:5])
lora = load_lora_adapter(adapter)
out.mkdir()
write_merged(base=base, out=out, delta_of=_lazy_deltas(lora), replaced={}, dtype="auto",
             shard_bytes=parse_size(str(size)), tokenizer_from=adapter)
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
IMPORTS = """
import torch, transformers, peft, safetensors  # the libraries every row loads
from transformers import AutoModelForCausalLM
from peft import PeftModel
"""
CLI = """
import sys
from peftune.cli import main
base, adapter, out, size = sys.argv[1:5]
sys.argv = ["peftune", "merge", "--base", base, "--adapter", adapter, "--out", out,
            "--shard-size", size, "--quiet"]
try:
    main()
except SystemExit as done:  # typer exits 0 after the command
    if done.code:
        raise
"""


def peak_of(code: str, *args: str) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of a fresh Python process running `code`."""
    # VmHWM: this process's own peak (ru_maxrss would report the parent's peak after fork)
    script = (f"{code}\nprint([l.split()[1] for l in open('/proc/self/status') "
              "if l.startswith('VmHWM')][0])")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return int(done.stdout.strip().splitlines()[-1]) / 1024, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shard-size", default="10MB")
    args = parser.parse_args()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peftune.models import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tiny_model(root / "single", hidden_size=args.hidden, layers=args.layers, heads=8)
        model = AutoModelForCausalLM.from_pretrained(root / "single", dtype=torch.float32)
        base = root / "base"
        model.save_pretrained(base, max_shard_size=args.shard_size)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (base / name).write_bytes((root / "single" / name).read_bytes())
        peft_model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.01)
        peft_model.save_pretrained(root / "adapter")
        size_mib = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20
        shards = len(list(base.glob("*.safetensors")))
        del model, peft_model
        rows = {}
        for label, code in (("imports only (torch, transformers, peft)", IMPORTS),
                            ("peftune streaming write", STREAM), ("peftune merge (with verification)", CLI),
                            ("peft merge_and_unload + save_pretrained", PEFT)):
            out = root / label.split()[0] / label.split()[1]
            out.parent.mkdir(exist_ok=True)
            rows[label] = peak_of(code, str(base), str(root / "adapter"), str(out), args.shard_size)
    print(f"base: hidden {args.hidden}, {args.layers} layers, {size_mib:.1f} MiB fp32 in {shards} "
          f"shards of <= {args.shard_size}; LoRA r=16 on every linear")
    floor = rows["imports only (torch, transformers, peft)"][0]
    peft_rss = rows["peft merge_and_unload + save_pretrained"][0] - floor
    for label, (rss, seconds) in rows.items():
        above = rss - floor
        print(f"  {label:<42} peak RSS {rss:8.1f} MiB, {above:7.1f} above imports "
              f"({above / peft_rss:.2f}x peft)  {seconds:6.1f}s")
    print(json.dumps({k: {"peak_rss_mib": round(v[0], 1), "seconds": round(v[1], 2)}
                      for k, v in rows.items()}))


if __name__ == "__main__":
    main()
