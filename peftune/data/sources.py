"""Rows from the files a recipe names: JSONL, JSON, parquet, CSV, or a directory written by
`datasets.Dataset.save_to_disk`.

Every row travels with a location (`train.jsonl:12`, `train.json: item 3`, `train.csv:7`,
`train.parquet: row 5`) so that a bad row is reported where the user can find it: lines are
1-based as editors show them, items and rows are 0-based indices as Python shows them.
JSONL, CSV and parquet are streamed, so a big file is never held in memory as Python objects
all at once. A row that cannot even be parsed (invalid JSON, not an object) is yielded with a
problem instead of a row, so that the caller can collect every bad row before failing.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftune.errors import InputError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
SUPPORTED_TEXT = ".jsonl, .json, .parquet, .csv, or a directory written by datasets' save_to_disk"
# Files that `save_to_disk` writes at the top of a Dataset or DatasetDict directory.
_DATASETS_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")


@dataclass(frozen=True)
class SourceRow:
    """One row as read: `row` is the parsed object, or None with `problem` saying why not."""

    location: str
    row: dict[str, Any] | None
    problem: str | None = None


def resolve_source(path: str, *, key: str) -> Path:
    """Check that `path` exists and is a kind of file we read; `key` names the recipe key
    (data.train, data.val) so that the message points at the line to fix."""
    resolved = Path(path).expanduser()
    if not resolved.exists():
        if resolved.is_symlink():  # exists() follows links: a loop or a dangling target
            raise InputError(f"{key}: {path} is a broken symbolic link or a symlink loop; "
                             "point it at the data file itself")
        where = "" if resolved.is_absolute() else (
            f" (looked for in {Path.cwd()}: relative paths start where peftune runs)")
        raise InputError(f"{key}: no such file or directory: {path}{where}")
    if not resolved.is_dir():
        if not resolved.is_file():
            raise InputError(f"{key}: {path} is not a regular file; give a data file: "
                             f"{SUPPORTED_TEXT}")
        try:
            resolved.open("rb").close()
        except OSError as err:  # permission denied, mostly
            raise InputError(f"{key}: cannot read {path} ({err.strerror or err}); check the "
                             "file's permissions") from None
    if resolved.is_dir():
        if not any((resolved / marker).is_file() for marker in _DATASETS_MARKERS):
            raise InputError(
                f"{key}: {path} is a directory but not one written by datasets' save_to_disk "
                f"(no {' or '.join(_DATASETS_MARKERS)}); give a file: {SUPPORTED_TEXT}"
            )
        return resolved
    if resolved.suffix.lower() not in SUPPORTED_SUFFIXES:
        suffix = resolved.suffix or "(none)"
        raise InputError(f"{key}: {path}: unsupported file type {suffix}; use {SUPPORTED_TEXT}")
    return resolved


def iter_rows(path: Path, *, key: str, display: str,
              limit: int | None = None) -> Iterator[SourceRow]:
    """The rows of a resolved source, in file order, at most `limit` of them (bad ones count)."""
    if path.is_dir():
        reader = _read_saved_dataset(path, key=key, display=display)
    else:
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet,
                   ".csv": _read_csv}
        reader = readers[path.suffix.lower()](path, key=key, display=display)
    return itertools.islice(reader, limit)


def _as_row(value: Any, location: str, what: str) -> SourceRow:
    if isinstance(value, dict):
        return SourceRow(location, value)
    return SourceRow(location, None, f"expected {what}, got {json_type(value)}")


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages a user of any of the formats can read."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _read_jsonl(path: Path, *, key: str, display: str) -> Iterator[SourceRow]:
    # Binary lines: a line that is not UTF-8 is one bad row, not a crash of the whole read.
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue  # blank lines (often a trailing one) are not rows
            location = f"{display}:{number}"
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                yield SourceRow(location, None, f"invalid JSON: {exc.msg} (column {exc.colno})")
                continue
            except UnicodeDecodeError:
                yield SourceRow(location, None, "the line is not valid UTF-8")
                continue
            yield _as_row(value, location, "a JSON object")


def _read_json(path: Path, *, key: str, display: str) -> Iterator[SourceRow]:
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise InputError(f"{key}: {display}:{exc.lineno}: invalid JSON: {exc.msg} "
                         f"(column {exc.colno})") from None
    except UnicodeDecodeError:
        raise InputError(f"{key}: {display}: the file is not valid UTF-8") from None
    if not isinstance(data, list):
        raise InputError(f"{key}: {display}: expected a JSON list of objects, got "
                         f"{json_type(data)}; for one object per line use a .jsonl file")
    for index, value in enumerate(data):
        yield _as_row(value, f"{display}: item {index}", "a JSON object")


def _read_csv(path: Path, *, key: str, display: str) -> Iterator[SourceRow]:
    # Long text cells are normal in training data; the csv module's default cap is 128 KiB.
    csv.field_size_limit(2**31 - 1)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        # A record can span several lines (quoted newlines): report the line where it starts.
        start = 2
        try:
            for record in reader:
                yield SourceRow(f"{display}:{start}", dict(record))
                start = reader.line_num + 1
        except (csv.Error, UnicodeDecodeError) as exc:
            raise InputError(f"{key}: {display}:{reader.line_num}: cannot read CSV: {exc}") \
                from None


def _read_parquet(path: Path, *, key: str, display: str) -> Iterator[SourceRow]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged or foreign file
        raise InputError(f"{key}: {display}: cannot read parquet: {exc}") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield SourceRow(f"{display}: row {index}", record)
            index += 1


def _read_saved_dataset(path: Path, *, key: str, display: str) -> Iterator[SourceRow]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, ... for bad dirs
        raise InputError(f"{key}: {display}: cannot load the saved dataset: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            splits = ", ".join(loaded) or "(none)"
            raise InputError(f"{key}: {display}: the saved DatasetDict has no 'train' split "
                             f"(it has {splits}); save the split you want with save_to_disk")
        loaded = loaded["train"]
    for index, record in enumerate(loaded):
        yield SourceRow(f"{display}: row {index}", dict(record))
