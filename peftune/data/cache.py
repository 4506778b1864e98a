"""Tokenized data cached by content, so that a second run on the same data skips tokenizing.

The key is a sha256 over everything that decides the tokens: the source's bytes (streamed, so
a big file is never read into memory), the DataSection fields that change how rows become
tokens, a fingerprint of the tokenizer (its full serialized pipeline, chat template and special
token ids) and DATA_FORMAT_VERSION, bumped whenever this package changes its output. Nothing
path- or time-based is in the key: a copied file hits, a touched-but-equal file hits, and any
edited byte misses. Truncation to `max_length` happens after loading, so that trying another
max_length reuses the cache.

An entry is one .npz (flat token arrays + offsets + a JSON metadata string), written to a
temporary file and renamed into place, so that a crash or a parallel run never leaves a
half-written entry under a valid name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from peftune.recipe.schema import DataSection

DATA_FORMAT_VERSION = 2  # 2: preference roles and source rows
# DataSection fields that do not change the cached tokens: where the data is and what happens
# to the examples after tokenizing (split, truncation, packing). Every other field is in the
# key, so that a field added to DataSection later invalidates the cache by default.
_FIELDS_NOT_IN_KEY = frozenset({"train", "val", "val_ratio", "max_length", "packing", "select"})
_CHUNK = 1 << 20

log = logging.getLogger("peftune.data")


def default_cache_dir() -> Path:
    """`$PEFTUNE_CACHE/tokenized`, else `~/.cache/peftune/tokenized`."""
    root = os.environ.get("PEFTUNE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "peftune"
    return base / "tokenized"


def source_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes, or of a saved-datasets directory's files (names + bytes)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides a tokenizer's output. Fast tokenizers serialize their whole
    pipeline (normalizer, pre-tokenizer, model, post-processor, added tokens); slow ones fall
    back to the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    described = {
        "class": type(tokenizer).__name__,
        "pipeline": backend.to_str() if backend is not None
        else sorted(tokenizer.get_vocab().items()),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_ids": {name: getattr(tokenizer, f"{name}_token_id", None)
                        for name in ("bos", "eos", "pad", "unk")},
        "all_special_ids": list(tokenizer.all_special_ids),
    }
    blob = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key(cfg: DataSection, *, source: str, tokenizer: str, limit: int | None) -> str:
    """The entry name for one source: its fingerprint, the relevant fields and the tokenizer."""
    fields = {name: value for name, value in cfg.model_dump().items()
              if name not in _FIELDS_NOT_IN_KEY}
    fields["max_examples"] = limit  # val files are read whole, whatever max_examples says
    blob = json.dumps({"version": DATA_FORMAT_VERSION, "source": source, "tokenizer": tokenizer,
                       "fields": fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_entry(cache_dir: Path, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The arrays and metadata stored under `key`, or None when absent or unreadable."""
    path = cache_dir / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files if name != "meta"}
            meta = json.loads(str(stored["meta"]))
    except Exception as exc:  # a damaged entry is a miss, never a failed run
        log.warning("ignoring unreadable tokenized cache %s: %s", path, exc)
        return None
    if meta.get("version") != DATA_FORMAT_VERSION:
        return None
    return arrays, meta


def save_entry(cache_dir: Path, key: str, arrays: dict[str, np.ndarray],
               meta: dict[str, Any]) -> None:
    """Write an entry atomically; a cache that cannot be written only costs the next run time."""
    meta = {**meta, "version": DATA_FORMAT_VERSION}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, meta=np.array(json.dumps(meta)), **arrays)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, cache_dir / f"{key}.npz")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.warning("could not write the tokenized cache in %s: %s", cache_dir, exc)
