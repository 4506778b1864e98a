"""peftune's model cache: pulled catalogue files and GGUF files converted to Hugging Face
directories. Torch-free.

Layout under `PEFTUNE_MODELS`, else `PEFTUNE_CACHE` (the root the tokenized-data cache uses
too), else `~/.cache/peftune`:

  pulled/NAME/FILE.gguf        a catalogue model's file, hash-verified when pulled
  gguf/SHA256[:16]/            a GGUF file dequantized into safetensors + config + tokenizer
  gguf/hashes.json             sha256 of GGUF files already hashed, by (path, size, mtime)

Every entry is built in a temporary sibling and renamed into place under a file lock, so two
processes (two ranks, two terminals) never see a half-written entry and never build one twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

HASH_CHUNK = 1 << 22  # 4 MiB reads


def cache_root() -> Path:
    configured = os.environ.get("PEFTUNE_MODELS") or os.environ.get("PEFTUNE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "peftune"


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """An exclusive lock on `cache_root()/locks/NAME.lock` (released on exit, even on error)."""
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fresh_temp_sibling(final: Path) -> Path:
    """An empty directory next to `final` to build an entry in (renamed onto `final` by
    `publish`); a leftover from a killed earlier attempt is removed first."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_index(path: Path) -> tuple[str, Path, dict]:
    """(the file's key, the index file, the index) of the remembered hashes."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_file = cache_root() / "gguf" / "hashes.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    return key, index_file, index if isinstance(index, dict) else {}


def remembered_sha256(path: Path) -> str | None:
    """The sha256 recorded when the file was last hashed, or None (never hashes it now)."""
    try:
        key, _, index = _hash_index(path)
    except OSError:
        return None
    found = index.get(key)
    return found if isinstance(found, str) else None


def known_sha256(path: Path) -> str:
    """The file's sha256, remembered by (resolved path, size, mtime) so that a multi-GB GGUF
    is hashed once, not on every run."""
    key, index_file, index = _hash_index(path)
    if isinstance(index.get(key), str):
        return index[key]
    digest = sha256_of(path)
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        index_file.parent.mkdir(parents=True, exist_ok=True)
        index[key] = digest
        tmp = index_file.with_name(f".hashes-{os.getpid()}.json")
        tmp.write_text(json.dumps(index, indent=0))
        os.replace(tmp, index_file)
    return digest
