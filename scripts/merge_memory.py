"""Peak RSS of merging a LoRA into a sharded base, split by stage: peftune's streaming writer
alone (no verification), the whole `peftune merge` (merge, per-module check and the
module-by-module logits check), and peft's `merge_and_unload()` + `save_pretrained`. Each runs
in its own process; the model, the adapter and the measurement (the process's VmHWM) are
`bench_merge`'s.

    python scripts/merge_memory.py [--hidden 512] [--layers 8] [--shard-size 10MB]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import benchlib
from bench_merge import IMPORTS, PEFT, PEFTUNE, build, measure

STREAM = """
import sys
from pathlib import Path
from peftune.merge.deltas import lazy_deltas, load_lora_adapter
from peftune.merge.writer import parse_size, write_merged
base, adapter, out, size = map(Path, sys.argv[1:5])
lora = load_lora_adapter(adapter)
out.mkdir()
write_merged(base=base, out=out, delta_of=lazy_deltas(lora), replaced={}, dtype="auto",
             shard_bytes=parse_size(str(size)), tokenizer_from=adapter)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shard-size", default="10MB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, adapter, shards, size_mib = build(root, hidden=args.hidden, layers=args.layers,
                                                shard_size=args.shard_size)
        rows = {}
        for i, (label, code) in enumerate((("imports only (torch, transformers, peft)", IMPORTS),
                                           ("peftune streaming write", STREAM),
                                           ("peftune merge (with verification)", PEFTUNE),
                                           ("peft merge_and_unload + save_pretrained", PEFT))):
            rows[label] = measure(code, base, adapter, root / f"out-{i}", args.shard_size)
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
    return 0


if __name__ == "__main__":
    benchlib.run_main(main)
