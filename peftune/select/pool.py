"""Reading a pool for selection: rows streamed in chunks, the text each row is scored by, and
the rows written back out unchanged.

A JSONL pool is read as raw lines: the line is kept as bytes, parsed in a worker process,
and, if selected, written out byte for byte. Other sources (JSON, parquet, CSV, a saved
datasets directory) go through `peftune.data.sources` and are written out as one JSON object
per line. Chunks never span files; a row's place is (file, line or row index) so that a
bad row is reported where the user can find it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftune.data.formats import RowError, chat_messages, instruction_format, string_field
from peftune.data.sources import iter_rows, json_type, resolve_source
from peftune.errors import InputError
from peftune.select.config import SelectConfig

_decode = json.JSONDecoder().decode
_BOM = b"\xef\xbb\xbf"
CHUNK_ROWS = 1024  # fixed, so chunk boundaries (and every result) never depend on num_proc


@dataclass(frozen=True)
class TextRule:
    """Which text of a row is scored, read from a config with the data section's text keys
    (`format`, `text_field`, `prompt_field`, ...): a field as is (format text), or the
    example rendered as training renders it, chat turns as `role: content` lines."""

    keys: Any  # a SelectConfig

    @classmethod
    def for_pool(cls, cfg: SelectConfig) -> TextRule:
        return cls(cfg)

    @classmethod
    def for_target(cls, cfg: SelectConfig) -> TextRule:
        if cfg.target_text_field is None:
            return cls(cfg)
        return cls(cfg.model_copy(update={"format": "text", "text_field": cfg.target_text_field}))

    def text(self, row: dict[str, Any]) -> str:
        """The scored text of a row, or RowError (the rules of `peftune.data.formats`)."""
        keys = self.keys
        if keys.format == "text":
            return string_field(row, keys.text_field, allow_empty=True)
        if keys.format == "instruction":
            return "".join(part for part, _ in instruction_format(row, keys, None).parts)
        messages = chat_messages(row, keys.messages_field)
        return "\n".join(f"{turn['role']}: {turn['content']}" for turn in messages)


@dataclass
class Chunk:
    """Consecutive rows of one file: `payloads` are raw JSONL lines (bytes) or parsed rows.

    A lazy chunk of a JSONL file holds only where its lines are (`span`: byte offset, byte
    length, first line number); the worker process that scores it reads them, so the rows
    never travel between processes."""

    index: int  # chunk number over the whole pool
    display: str  # the file, as the user named it
    first_row: int  # global index of the first row
    payloads: list[Any]
    places: list[int]  # line numbers (JSONL, CSV) or row indices (others)
    by_line: bool  # places are line numbers
    path: Path | None = None
    span: tuple[int, int, int] | None = None

    def location(self, position: int) -> str:
        number = self.places[position]
        return f"{self.display}:{number}" if self.by_line else f"{self.display}: row {number}"

    @property
    def nbytes(self) -> int:
        if self.span is not None:
            return self.span[1]
        return sum(len(p) for p in self.payloads) if self.by_line else 0

    def load(self) -> Chunk:
        """Read a lazy chunk's lines (a no-op for other chunks)."""
        if self.span is None or self.payloads:
            return self
        offset, length, first_line = self.span
        with self.path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        for number, line in enumerate(data.split(b"\n"), start=first_line):
            if line.strip():
                self.payloads.append(line)
                self.places.append(number)
        return self


def resolve_files(paths: list[str], key: str) -> list[Path]:
    if not paths:
        raise InputError(f"{key}: give at least one file")
    return [resolve_source(path, key=key) for path in paths]


def iter_chunks(files: list[Path], displays: list[str], *, key: str,
                owner: tuple[int, int] = (0, 1), lazy: bool = False) -> Iterator[Chunk]:
    """The pool in chunks of CHUNK_ROWS rows, in pool order. With `owner=(rank, world)` only
    chunks whose number is rank modulo world are yielded (rows of other chunks are counted
    and skipped), so ranks take disjoint shards that together cover the pool. With `lazy`,
    JSONL chunks come as byte spans for the worker to read (`Chunk.load`)."""
    rank, world = owner
    number, first_row = 0, 0
    for path, display in zip(files, displays, strict=True):
        if lazy and path.is_file() and path.suffix.lower() == ".jsonl":
            for span, rows in _line_spans(path):
                if number % world == rank:
                    yield Chunk(number, display, first_row, [], [], True, path, span)
                number, first_row = number + 1, first_row + rows
            continue
        by_line = path.suffix.lower() in (".jsonl", ".csv")
        payloads: list[Any] = []
        places: list[int] = []
        for payload, where in _payloads(path, display, key):
            payloads.append(payload)
            places.append(where)
            if len(payloads) == CHUNK_ROWS:
                if number % world == rank:
                    yield Chunk(number, display, first_row, payloads, places, by_line)
                number, first_row = number + 1, first_row + len(payloads)
                payloads, places = [], []
        if payloads:
            if number % world == rank:
                yield Chunk(number, display, first_row, payloads, places, by_line)
            number, first_row = number + 1, first_row + len(payloads)


def _line_spans(path: Path) -> Iterator[tuple[tuple[int, int, int], int]]:
    """((byte offset, byte length, first line number), rows) of each CHUNK_ROWS non-blank
    lines of a JSONL file: the same chunks `_payloads` would make."""
    offset = start = 0
    first_line, rows = 1, 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            offset += len(line)
            if line.strip():
                rows += 1
                if rows == CHUNK_ROWS:
                    yield (start, offset - start, first_line), rows
                    start, first_line, rows = offset, number + 1, 0
    if rows:
        yield (start, offset - start, first_line), rows


def _payloads(path: Path, display: str, key: str) -> Iterator[tuple[Any, int]]:
    if path.is_file() and path.suffix.lower() == ".jsonl":
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield line, number
        return
    is_csv = path.suffix.lower() == ".csv"
    for index, source_row in enumerate(iter_rows(path, key=key, display=display)):
        if source_row.row is None:
            raise InputError(f"{key}: {source_row.location}: {source_row.problem}")
        where = int(source_row.location.rsplit(":", 1)[1]) if is_csv else index
        yield source_row.row, where


def parse_payload(payload: Any) -> dict[str, Any]:
    """A row from a raw JSONL line, or RowError."""
    if not isinstance(payload, bytes):
        return payload
    try:
        # Decoding first and calling the decoder directly skips json.loads' encoding sniffing,
        # a third of its cost on short lines.
        value = _decode(payload.decode("utf-8-sig" if payload[:3] == _BOM else "utf-8"))
    except UnicodeDecodeError:
        raise RowError("the line is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RowError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(value, dict):
        raise RowError(f"expected a JSON object, got {json_type(value)}")
    return value


def output_line(payload: Any) -> bytes:
    """A selected row as written: the JSONL line unchanged, or the row as one JSON object."""
    if isinstance(payload, bytes):
        line = payload.removeprefix(_BOM)  # a file's byte-order mark is not part of its row
        return line if line.endswith(b"\n") else line + b"\n"
    text = json.dumps(payload, ensure_ascii=False, default=str)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: write it escaped, as JSON allows
        return (json.dumps(payload, default=str) + "\n").encode("utf-8")


def read_texts(files: list[Path], displays: list[str], rule: TextRule, *,
               key: str) -> list[str]:
    """Every scored text of some (small) files, such as a target sample."""
    texts = []
    for chunk in iter_chunks(files, displays, key=key):
        for position, payload in enumerate(chunk.payloads):
            try:
                texts.append(rule.text(parse_payload(payload)))
            except RowError as err:
                raise InputError(f"{key}: {chunk.location(position)}: "
                                 f"{err.message}") from None
    return texts
