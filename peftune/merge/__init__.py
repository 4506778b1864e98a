"""`peftune merge`: an adapter folded into its base, and several LoRAs combined exactly.

- `runner.run_merge` is the one entry point (the CLI parses flags and calls it).
- `deltas` reads a PEFT LoRA adapter into per-module ΔW = scale·B·A (fp32, exact).
- `writer` writes a Hugging Face model directory shard by shard: one base shard is read,
  the deltas of its modules are added in fp32, the result is cast and written (streaming).
- `stio` reads and writes safetensors one tensor at a time (planned output shards).
- `combine` holds the multi-adapter merge methods (TIES, DARE, ...) on ΔW; `registry`
  names them (torch-free, for validating merge.yaml).
- `verify` compares the merged model's logits with base + adapter on probe inputs (module by
  module for streamed plain-LoRA merges: `LazyWeights`).

Conventions and formulas: docs/merging.md.
"""
