"""Loading base models and tokenizers (train, eval, merge), with peftune's safety defaults.

`trust_remote_code` comes from the recipe and is off unless it says so (a warning is printed
when on); weights load from safetensors only (`use_safetensors=True`), and a model or adapter
directory with only pickle weights (`*.bin`, `*.pt`) is refused unless
`model.allow_pickle: true`. Where a model comes from (directory, hub id, GGUF file, catalogue
name) is `peftune.models.sources`' business: every loader here takes the path it resolves.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from peftune.errors import InputError
from peftune.models.quiet import quiet_libraries
from peftune.models.sources import resolve_model_path
from peftune.recipe.model_facts import pickle_weights_problem

# The model paths warn_remote_code has warned about in this process (once each).
WARNED_REMOTE_CODE: set[str] = set()


def warn_remote_code(model_cfg: Any) -> None:
    """One warning line (once per model path) when the recipe lets a model run its own code."""
    if model_cfg.trust_remote_code and model_cfg.path not in WARNED_REMOTE_CODE:
        WARNED_REMOTE_CODE.add(model_cfg.path)
        print(f"warning: model.trust_remote_code is true: loading {model_cfg.path} runs the "
              "Python code shipped with it; set it only for a model you trust", file=sys.stderr)


def check_weights_format(directory: str | Path, *, allow_pickle: bool, key: str = "model.path",
                         weights: str = "model") -> None:
    """Refuse a local model or adapter directory whose only weights are pickle files (which
    can run code when unpickled), unless `allow_pickle`. A hub id is not checked here:
    `use_safetensors=True` makes transformers refuse pickle weights from the hub."""
    problem = pickle_weights_problem(directory, allow_pickle=allow_pickle, weights=weights)
    if problem:
        raise InputError(f"{key}: {problem}")


def check_model_loadable(path: str, *, trust_remote_code: bool) -> None:
    """Fail with one line when the model's config cannot be found (offline hub id, typo)."""
    from transformers import AutoConfig

    unreachable = _uncached_and_hub_unreachable(path)
    if unreachable:  # not transformers' retries: ten warning lines over half a minute
        raise InputError(
            f"model.path: '{path}' is not in the local hub cache and the hub cannot be reached "
            f"({unreachable}); download it where the hub is reachable, or point model.path "
            "at a local directory, a .gguf file or a catalogue model (peftune pull lists them)")
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise InputError(
            f"model.path: cannot find model '{path}' locally or in the hub cache "
            f"({_first_line(err)}); download it where the hub is reachable, or point "
            "model.path at a local directory"
        ) from err
    except ValueError as err:  # e.g. a custom architecture that needs trust_remote_code
        raise InputError(f"model.path: {path}: {_first_line(err)}") from err


def _uncached_and_hub_unreachable(path: str) -> str | None:
    """Why the hub cannot be asked for a hub id that is not cached (offline mode, or no
    connection to its host within 3 s), or None: a cached id, a local path, or a hub that
    answers."""
    import os
    import socket
    from urllib.parse import urlparse

    if Path(path).expanduser().exists() or path.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(path, "config.json"), str):
            return None
    except Exception:  # noqa: BLE001 - an id the cache cannot even look up: let transformers say
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as err:
        return f"{host}: {err.strerror or type(err).__name__}"
    return None


def load_tokenizer(model: Any, *, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, with a pad token (EOS stands in when the model has none)."""
    from transformers import AutoTokenizer

    check_model_loadable(model, trust_remote_code=trust_remote_code)
    quiet_libraries()
    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(model_cfg: Any, quant_cfg: Any, *, device: Any,
                             gradient_checkpointing: bool | int = False,
                             trains_base_weights: bool = False) -> tuple[Any, Any]:
    """The base model (see `load_model`) and its tokenizer."""
    model = load_model(model_cfg, quant_cfg, device=device,
                       gradient_checkpointing=gradient_checkpointing,
                       trains_base_weights=trains_base_weights)
    return model, load_tokenizer(resolve_model_path(model_cfg.path),
                                 trust_remote_code=model_cfg.trust_remote_code)


def load_model(model_cfg: Any, quant_cfg: Any, *, device: Any,
               gradient_checkpointing: bool | int = False, trains_base_weights: bool = False) -> Any:
    """Load the base model onto `device`, quantized if the recipe asks, with activation
    checkpointing on every decoder layer (`gradient_checkpointing` true or 1), every N-th
    (an integer N), or none.

    `trust_remote_code` is passed through from the recipe and is off by default; weights load
    from safetensors only unless `model.allow_pickle`. A hub id that is not in the local
    cache fails with one line.
    """
    from transformers import AutoModelForCausalLM

    from peftune.quant import prepare_quantized_model, quantization_config

    path = resolve_model_path(model_cfg.path)
    allow_pickle = getattr(model_cfg, "allow_pickle", False)
    check_weights_format(path, allow_pickle=allow_pickle)
    warn_remote_code(model_cfg)
    check_model_loadable(path, trust_remote_code=model_cfg.trust_remote_code)
    quiet_libraries()

    quant = quantization_config(quant_cfg, device=device)
    # A checkpoint saved quantized (bitsandbytes) loads quantized whatever the recipe says; it
    # then needs the same preparation as a base quantized at load (the CPU fix above all).
    prequantized = quant is None and _saved_quantized(path, model_cfg.trust_remote_code)
    dtype = _model_dtype(model_cfg.dtype, device=device, trains_base_weights=trains_base_weights)
    kwargs: dict[str, Any] = dict(
        dtype=dtype, trust_remote_code=model_cfg.trust_remote_code,
        attn_implementation=model_cfg.attn_implementation or "sdpa",
    )
    if quant is not None:
        kwargs["quantization_config"] = quant
    if (quant is not None or prequantized) and device.type == "cuda":
        kwargs["device_map"] = {"": device}
    # use_safetensors None: safetensors when the model has them, else its pickle files
    # (allowed above); True refuses pickle weights, from a local directory or the hub.
    model = AutoModelForCausalLM.from_pretrained(
        path, use_safetensors=None if allow_pickle else True, **kwargs)
    if quant_cfg.method != "none" or prequantized:  # int4 loads unquantized, quantized here
        model = prepare_quantized_model(model, quant_cfg, device=device)
    else:
        model.to(device)
    if gradient_checkpointing:
        # transformers' own selective checkpointing: layers 0, N, 2N, ...
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False},
            every_n_layers=int(gradient_checkpointing))
    model.config.use_cache = False
    return model


def _saved_quantized(path: str, trust_remote_code: bool) -> bool:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return getattr(config, "quantization_config", None) is not None


def _model_dtype(name: str, *, device: Any, trains_base_weights: bool) -> Any:
    """`auto`: fp32 on CPU; on a GPU with bf16, a frozen base is stored in bf16 while weights
    that train stay fp32 (mixed precision computes in bf16 either way)."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda" and torch.cuda.is_bf16_supported() and not trains_base_weights:
        return torch.bfloat16
    return torch.float32


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
