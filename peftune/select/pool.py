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
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np

from peftune.data.formats import RowError, chat_messages, instruction_format, string_field
from peftune.data.sources import iter_rows, json_type, resolve_source
from peftune.errors import InputError
from peftune.select.config import SelectConfig

_decode = json.JSONDecoder().decode
_scan = json.JSONDecoder().scan_once  # what `decode` runs, without its whitespace handling
_JSON_SPACE = " \t\n\r"
_BOM = b"\xef\xbb\xbf"
CHUNK_ROWS = 1024  # fixed, so chunk boundaries (and every result) never depend on num_proc
SPAN_BLOCK = 1 << 22  # bytes read at a time to find chunk boundaries
_SPACE_BYTES = np.zeros(256, dtype=bool)  # what bytes.strip() removes
_SPACE_BYTES[list(b" \t\n\r\x0b\x0c")] = True


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

    def texts(self, rows: list[dict[str, Any]]) -> list[str] | None:
        """The scored texts of many rows at once when every row has a string field (format
        text), else None: then `text` row by row says what is wrong, or renders them."""
        if self.keys.format != "text":
            return None
        try:
            texts = list(map(itemgetter(self.keys.text_field), rows))
        except KeyError:
            return None
        return texts if set(map(type, texts)) <= {str} else None


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
        lines = data.split(b"\n")
        body = lines if lines[-1].strip() else lines[:-1]  # after the last newline: nothing
        if b"" not in map(bytes.strip, body):  # no blank line: the usual case, at C speed
            self.payloads += body
            self.places += range(first_line, first_line + len(body))
            return self
        for number, line in enumerate(lines, start=first_line):
            if line.strip():
                self.payloads.append(line)
                self.places.append(number)
        return self


def resolve_files(paths: list[str], key: str) -> list[Path]:
    if not paths:
        raise InputError(f"{key}: give at least one file")
    return [resolve_source(path, key=key) for path in paths]


def iter_chunks(files: list[Path], displays: list[str], *, key: str,
                owner: tuple[int, int] = (0, 1), lazy: bool = False,
                spans: dict[Path, list] | None = None) -> Iterator[Chunk]:
    """The pool in chunks of CHUNK_ROWS rows, in pool order. With `owner=(rank, world)` only
    chunks whose number is rank modulo world are yielded (rows of other chunks are counted
    and skipped), so ranks take disjoint shards that together cover the pool. With `lazy`,
    JSONL chunks come as byte spans for the worker to read (`Chunk.load`); `spans` keeps each
    JSONL file's spans once found, so a second pass does not read the file line by line."""
    rank, world = owner
    number, first_row = 0, 0
    for path, display in zip(files, displays, strict=True):
        if lazy and path.is_file() and path.suffix.lower() == ".jsonl":
            found = spans.get(path) if spans is not None else None
            if found is None:
                found = _line_spans(path)
                if spans is not None:
                    found = spans[path] = list(found)
            for span, rows in found:
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
    lines of a JSONL file: the same chunks `_payloads` would make. The file is read in
    blocks whose newlines numpy finds; only lines that start with a space are looked at in
    Python, to tell blank ones (`bytes.strip()` empty) from the rest."""
    start, first_line, rows = 0, 1, 0  # the chunk being filled
    offset, lines, carry = 0, 0, b""  # where `block` starts; lines before it; partial line
    with path.open("rb") as handle:
        while data := handle.read(SPAN_BLOCK):
            block = carry + data
            cut = block.rfind(b"\n") + 1  # block[:cut] is whole lines
            carry = block[cut:]
            if not cut:
                continue
            ends = np.flatnonzero(np.frombuffer(block, dtype=np.uint8, count=cut) == 10) + 1
            begins = np.append(0, ends[:-1])
            blank = _SPACE_BYTES[np.frombuffer(block, dtype=np.uint8)[begins]]
            for i in np.flatnonzero(blank).tolist():
                blank[i] = not block[begins[i]:ends[i]].strip()
            filled = np.flatnonzero(~blank)  # lines of this block with a row
            for last in filled[CHUNK_ROWS - rows - 1::CHUNK_ROWS].tolist():
                yield (start, offset + int(ends[last]) - start, first_line), CHUNK_ROWS
                start, first_line = offset + int(ends[last]), lines + last + 2
            rows = (rows + len(filled)) % CHUNK_ROWS
            offset, lines = offset + cut, lines + len(ends)
    if carry.strip():  # a last line without a newline
        rows += 1
    if rows:
        yield (start, offset + len(carry) - start, first_line), rows


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


def parse_lines(lines: list[bytes]) -> list[dict[str, Any]] | None:
    """The rows of many JSONL lines, parsed at once: decoded as one string and scanned by
    C-level maps. None when any line needs `parse_payload`'s reading, which then gives the
    same rows or the first line's error: a byte-order mark, bytes that are not UTF-8, space
    before the value, anything but space after it, a value that is not an object, bad JSON."""
    try:
        text = b"\n".join(lines).decode("utf-8")
        if "\ufeff" in text:
            return None
        strings = text.split("\n")  # a line holds no newline, and UTF-8 never splits one
        parsed = list(map(_scan, strings, repeat(0)))
    except Exception:  # noqa: BLE001 - parse_payload reads the lines again and says why
        return None
    if len(parsed) != len(strings):  # a StopIteration (no value at column 1) ended the map
        return None
    ends = list(map(itemgetter(1), parsed))
    if ends != list(map(len, strings)) and any(
            string[end:].strip(_JSON_SPACE) for string, end in zip(strings, ends, strict=True)):
        return None
    rows = list(map(itemgetter(0), parsed))
    return rows if set(map(type, rows)) <= {dict} else None


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
