"""`peftune export`: a run or a model written as one file that runs outside peftune.

- `runner.run_export` is the entry point (the CLI parses flags and calls it): it merges a
  run's adapter through `peftune merge`'s verified path, writes the file, reads it back and
  only then puts it at `--out`.
- `gguf_writer` writes a Llama-family or Qwen2 model as GGUF (hyper-parameters, tensor
  names and types, llama's Q/K row order), one tensor at a time; `gguf_vocab` its byte-level
  BPE vocabulary (tokens, types, merges, special ids, chat template).
- `readback` checks the written file: metadata with gguf's reader, logits with
  transformers' GGUF loader against the merged model.
- `modelfile` converts the chat template into an Ollama Modelfile (`--ollama`).

Importing this package imports nothing heavy; its modules import gguf and torch.
"""
