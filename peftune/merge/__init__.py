"""`peftune merge`: an adapter folded into its base, and several LoRAs or models combined exactly.

- `runner.run_merge` is the one entry point (the CLI parses flags and calls it): it decides
  between a merge.yaml (`multi` for `adapters:`, `model_merge` for `models:`) and one run or
  `--base/--adapter` (`adapter_merge`).
- `common` holds what the flows share: the base on disk, progress lines, and the staging
  directory a verified merge is published from (`publish_verified`).
- `deltas` reads a PEFT LoRA adapter into per-module ΔW = scale·B·A (fp32, exact).
- `writer` writes a Hugging Face model directory shard by shard: one base shard is read,
  the deltas of its modules are added in fp32, the result is cast and written (streaming).
- `stio` reads and writes safetensors one tensor at a time (planned output shards).
- `whole_model` loads whole models through transformers and peft (peft's own merge for the
  methods that are not plain LoRA, and the whole-model verification).
- `combine` holds the multi-adapter merge methods (TIES, DARE, ...) on ΔW; `registry`
  names them (torch-free, for validating merge.yaml, read by `config`).
- `verify` compares the merged model's logits with base + adapter on probe inputs (module by
  module for streamed plain-LoRA merges: `LazyWeights`).

Conventions and formulas: docs/merging.md.
"""
