"""GGUF files as a model source: checked, then dequantized once into a Hugging Face directory.

transformers reads GGUF through the `gguf` package and dequantizes every tensor to fp32, but
a model loaded that way refuses `save_pretrained` (it is flagged as gguf-quantized) and the
conversion takes tens of seconds (the tokenizer alone is rebuilt from the file's vocabulary).
So peftune converts a GGUF file once: a model built from the file's config (without its
quantization flag) takes the dequantized weights, and the model, tokenizer (chat template
included) and generation config are saved as safetensors in the cache, keyed by the file's
sha256. Every later run loads that directory like any local model.

`inspect_gguf` reads only the header (torch-free, fast): a truncated or corrupt file, or an
architecture transformers cannot read, is refused before anything heavy loads.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftune.errors import InputError
from peftune.models import cache

SOURCE_FILE = "peftune_source.json"  # written into each converted directory
# gguf architectures that are not decoder-only language models peftune can train
_NOT_CAUSAL_LM = {"t5", "t5encoder", "umt5", "bert", "nomic-bert", "jina-bert-v2"}


@dataclass(frozen=True)
class GgufInfo:
    path: Path
    architecture: str
    name: str | None
    context_length: int | None
    tensor_types: tuple[str, ...]


def inspect_gguf(path: Path, *, key: str = "model.path") -> GgufInfo:
    """The header of a GGUF file; one line (InputError) for anything transformers cannot read."""
    if not path.is_file():
        raise InputError(f"{key}: {path} does not exist; give the path of a .gguf file")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as err:
        raise InputError(f"{key}: {path}: cannot read it ({err.strerror})") from None
    if magic != b"GGUF":
        raise InputError(f"{key}: {path} is not a GGUF file (it does not start with the GGUF "
                         "magic bytes); give a .gguf model file")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        fields = reader.fields
        architecture = str(fields["general.architecture"].contents())
        types = tuple(sorted({t.tensor_type.name for t in reader.tensors}))
    except ImportError:
        raise InputError(f"{key}: reading GGUF files needs the `gguf` package; "
                         "pip install gguf") from None
    except Exception as err:  # noqa: BLE001 - every parse failure means the same thing
        raise InputError(f"{key}: {path} is truncated or corrupt (the GGUF reader cannot parse "
                         f"its {path.stat().st_size:,} bytes: {_first_line(err)[:80]}); download "
                         "it again") from None
    if not types:
        raise InputError(f"{key}: {path} holds no tensors (a GGUF file with a vocabulary only?); "
                         "give a model's .gguf file")
    supported = supported_architectures()
    if _normalised(architecture) not in supported or architecture in _NOT_CAUSAL_LM:
        causal = sorted(a for a in supported if a not in _NOT_CAUSAL_LM)
        raise InputError(f"{key}: {path} is a GGUF file of architecture '{architecture}', which "
                         f"transformers cannot load as a causal language model; supported: "
                         f"{', '.join(causal)}")
    unreadable = [t for t in types if not dequantizable(t)]
    if unreadable:
        raise InputError(f"{key}: {path} stores tensors as {', '.join(unreadable)}, which the "
                         f"installed gguf package cannot dequantize; readable types: "
                         f"{', '.join(readable_types())}")
    name = fields.get("general.name")
    context = fields.get(f"{architecture}.context_length")
    return GgufInfo(path=path, architecture=architecture,
                    name=str(name.contents()) if name is not None else None,
                    context_length=int(context.contents()) if context is not None else None,
                    tensor_types=types)


def supported_architectures() -> set[str]:
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    except ImportError:  # a transformers without GGUF support at all
        return set()
    return {a for a in GGUF_CONFIG_MAPPING if a not in ("general", "tokenizer")}


def _normalised(architecture: str) -> str:
    """transformers' own renames of llama.cpp architecture names (see load_gguf_checkpoint)."""
    renames = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
               "minimax-m2": "minimax_m2"}
    return renames.get(architecture, architecture)


def readable_types() -> list[str]:
    from gguf import GGMLQuantizationType

    return [t.name for t in GGMLQuantizationType if dequantizable(t.name)]


def dequantizable(type_name: str) -> bool:
    import gguf.quants

    if type_name in ("F32", "F16", "F64", "I8", "I16", "I32", "I64"):
        return True
    kind = getattr(gguf.GGMLQuantizationType, type_name, None)
    # gguf.quants keeps its implemented types in a private table; if that ever moves, let
    # the conversion itself report a type it cannot read
    traits = getattr(gguf.quants, "_type_traits", None)
    return kind is not None and (traits is None or kind in traits)


def converted_dir(sha256: str) -> Path:
    return cache.cache_root() / "gguf" / sha256[:16]


def is_converted(directory: Path) -> bool:
    return (directory / SOURCE_FILE).is_file() and (directory / "config.json").is_file()


def ensure_converted(path: Path, *, sha256: str | None = None, key: str = "model.path",
                     quiet: bool = False) -> Path:
    """The cached Hugging Face directory of a GGUF file, converting it the first time."""
    digest = sha256 or cache.known_sha256(path)
    final = converted_dir(digest)
    if is_converted(final):
        return final
    info = inspect_gguf(path, key=key)
    with cache.locked(f"gguf-{digest[:16]}"):
        if is_converted(final):  # another process converted it while this one waited
            return final
        if not quiet:
            print(f"converting {path.name} ({info.architecture}, {', '.join(info.tensor_types)}) "
                  f"to a Hugging Face model in {final} (once; later runs load it directly)",
                  file=sys.stderr, flush=True)
        tmp = cache.fresh_temp_sibling(final)
        try:
            _convert(path, tmp, key=key)
            (tmp / SOURCE_FILE).write_text(json.dumps(
                {"gguf": str(path.resolve()), "sha256": digest, "architecture": info.architecture,
                 "name": info.name, "tensor_types": list(info.tensor_types),
                 "converted_with": _versions()}, indent=2) + "\n")
            cache.publish(tmp, final)
        finally:
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
    return final


def source_record(directory: Path) -> dict | None:
    """What a converted directory was made from (its peftune_source.json), or None."""
    try:
        return json.loads((directory / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _convert(path: Path, out: Path, *, key: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftune.models.quiet import quiet_libraries

    quiet_libraries()
    # the absolute path: a bare name is looked for in the working directory first, where a
    # file of the same name would supply the weights while the config came from this one
    folder, name = str(path.parent), str(path.resolve())
    try:  # transformers draws its own per-tensor progress bar: peftune said what is going on
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            # the weights are the GGUF file's own tensors: no pickle is involved
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                          dtype=torch.float32,
                                                          use_safetensors=False)
    except (ValueError, NotImplementedError, KeyError) as err:
        raise InputError(f"{key}: {path}: transformers cannot convert this GGUF file "
                         f"({_first_line(err)})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain fp32 tensors
    config.name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise InputError(f"{key}: {path}: the dequantized tensors do not fit the model built "
                         f"from its config (missing {sorted(missing)[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]})")
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _versions() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("transformers", "gguf", "torch"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
