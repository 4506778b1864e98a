"""From the recipe's data section to tokenized train and validation sets.

`build_datasets` reads each source (sources.py), turns rows into segments (formats.py),
tokenizes them in batches with label masks, and caches the result (cache.py). After the
cache come the steps that are cheap and depend on fields outside the cache key: truncation to
`max_length`, dropping examples with no target token left, and the `val_ratio` split.

Examples are stored flat (one int32 array of tokens, one of labels, int64 offsets), which is
compact, maps directly onto the cache file and slices without copying.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peftune.data import cache
from peftune.data.formats import (
    IGNORE_INDEX,
    ROLE_CHOSEN,
    RowError,
    SegmentEncoder,
    check_format_setup,
    get_format,
)
from peftune.data.sources import iter_rows, resolve_source
from peftune.errors import InputError
from peftune.recipe.schema import DataSection, dotted_key

MAX_REPORTED_BAD_ROWS = 10
_ROWS_PER_BATCH = 1024  # rows tokenized per call of the tokenizer

log = logging.getLogger("peftune.data")


class TokenizedSet:
    """Tokenized examples: `data[i]` is (input_ids, labels), int32 views of the flat arrays;
    labels are IGNORE_INDEX (-100) where a token is not a target, and always at position 0.

    Preference data also has `roles` (int8 per example, formats.ROLE_*: a pair is a chosen
    example followed by its rejected one) and `source_rows` (each example's row ordinal in
    its source, for error lines)."""

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, *,
                 roles: np.ndarray | None = None, source_rows: np.ndarray | None = None):
        if len(input_ids) != len(labels) or offsets[0] != 0 or offsets[-1] != len(input_ids):
            raise ValueError("input_ids, labels and offsets do not describe the same examples")
        self.input_ids = np.asarray(input_ids, dtype=np.int32)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.roles = None if roles is None else np.asarray(roles, dtype=np.int8)
        self.source_rows = None if source_rows is None else np.asarray(source_rows, dtype=np.int64)

    @property
    def group(self) -> int:
        """Examples that stay together (in one row, one micro-batch): 2 for preference pairs."""
        return 2 if self.roles is not None and len(self.roles) and (
            self.roles[0] == ROLE_CHOSEN) else 1

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays that make up the set (what the cache stores)."""
        out = {"input_ids": self.input_ids, "labels": self.labels, "offsets": self.offsets}
        if self.roles is not None:
            out["roles"] = self.roles
        if self.source_rows is not None:
            out["source_rows"] = self.source_rows
        return out

    @classmethod
    def from_examples(cls, examples: list[tuple[np.ndarray, np.ndarray]]) -> TokenizedSet:
        lengths = [len(ids) for ids, _ in examples]
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        if not examples:
            return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), offsets)
        return cls(np.concatenate([ids for ids, _ in examples]),
                   np.concatenate([labels for _, labels in examples]), offsets)

    @classmethod
    def concatenate(cls, parts: list[TokenizedSet]) -> TokenizedSet:
        """The examples of `parts` end to end (one part: that part itself)."""
        if len(parts) == 1:
            return parts[0]
        ends = np.cumsum([0, *(part.num_tokens for part in parts[:-1])])

        def joined(name: str) -> np.ndarray | None:
            arrays = [getattr(part, name) for part in parts]
            return None if any(a is None for a in arrays) else np.concatenate(arrays)

        return cls(np.concatenate([part.input_ids for part in parts]),
                   np.concatenate([part.labels for part in parts]),
                   np.concatenate([[0]] + [part.offsets[1:] + end
                                           for part, end in zip(parts, ends, strict=True)]),
                   roles=joined("roles"), source_rows=joined("source_rows"))

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> TokenizedSet:
        return cls(arrays["input_ids"], arrays["labels"], arrays["offsets"],
                   roles=arrays.get("roles"), source_rows=arrays.get("source_rows"))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} out of range for {len(self)} examples")
        index %= len(self)
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.input_ids[start:end], self.labels[start:end]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(len(self.input_ids))

    @property
    def num_target_tokens(self) -> int:
        return int(np.count_nonzero(self.labels != IGNORE_INDEX))

    def target_counts(self, max_length: int | None = None, *, left: bool = False) -> np.ndarray:
        """Target tokens per example within its first (`left`: last) `max_length` tokens, the
        first kept token never counting (a cumulative sum: no Python loop over examples)."""
        cumulative = np.concatenate([[0], np.cumsum(self.labels != IGNORE_INDEX, dtype=np.int64)])
        starts, ends = self.offsets[:-1], self.offsets[1:]
        lengths = self.lengths if max_length is None else np.minimum(self.lengths, max_length)
        if left:  # the window's first token is never predicted (see select)
            return cumulative[ends] - cumulative[np.minimum(ends - lengths + 1, ends)]
        return cumulative[starts + lengths] - cumulative[starts]

    def select(self, indices: np.ndarray, *, max_length: int | None = None,
               left: bool = False) -> TokenizedSet:
        """The examples at `indices`, in that order, each cut to `max_length` tokens: its
        first ones, or with `left` its last ones (the cut example's new first token is not a
        target: nothing precedes it to predict it from)."""
        indices = np.asarray(indices, dtype=np.int64)
        starts = self.offsets[:-1][indices]
        lengths = self.lengths[indices]
        if max_length is not None:
            kept = np.minimum(lengths, max_length)
            if left:
                starts = starts + lengths - kept
            lengths = kept
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        # Token positions of the kept tokens, example by example, without a Python loop.
        gather = np.arange(offsets[-1], dtype=np.int64) + np.repeat(starts - offsets[:-1], lengths)
        labels = self.labels[gather]
        if left and len(labels):
            labels[offsets[:-1][lengths > 0]] = IGNORE_INDEX
        return TokenizedSet(
            self.input_ids[gather], labels, offsets,
            roles=None if self.roles is None else self.roles[indices],
            source_rows=None if self.source_rows is None else self.source_rows[indices])


@dataclass
class MixSource:
    """One source of a data mix as read: its recipe key (`data.train[1]`), path and weight,
    and its examples: `train[start:stop]` of the DataSplits (a mix's training set is its
    sources' usable examples end to end, in recipe order)."""

    key: str
    path: str
    weight: float
    start: int
    stop: int


@dataclass
class DataSplits:
    """What the training loop gets: the training set, the validation set if any, and counts
    worth printing (rows read and skipped, examples truncated or dropped, cache use, time).
    For a data mix, `sources` says which examples of `train` each source gave (how an
    epoch draws from them is peftune.data.mix)."""

    train: TokenizedSet
    val: TokenizedSet | None
    stats: dict[str, Any] = field(default_factory=dict)
    sources: list[MixSource] | None = None


def build_datasets(cfg: DataSection, tokenizer: Any, *, seed: int,
                   cache_dir: Path | None = None) -> DataSplits:
    """Read, tokenize (or load from the cache), truncate and split the recipe's data. Each
    source of a data mix (or of a validation list) is read on its own, with its own format
    keys and its own cache entry; `val_ratio` splits each training source alike."""
    problems = cfg.mix_problems()
    if problems:  # a DataSection built without a recipe (a recipe reports these on loading)
        raise InputError(*(f"{dotted_key(path)}: {message}" for path, message in problems))
    train_sources, val_sources = cfg.sources("train"), cfg.sources("val")
    for key, section in train_sources + val_sources:
        _check_setup(section, tokenizer, key)
    directory = Path(cache_dir) if cache_dir is not None else cache.default_cache_dir()
    token_print = cache.tokenizer_fingerprint(tokenizer)
    stats: dict[str, Any] = {"rows_read": 0, "rows_skipped": 0, "dropped_no_target": 0,
                             "truncated": 0, "cache_hit": True, "tokenize_seconds": 0.0,
                             "bad_rows": []}
    counted: dict[str, str] = {}  # per source: its rows read, skipped, dropped (for errors)

    def load(section: DataSection, key: str, limit: int | None) -> TokenizedSet:
        path = section.train  # the source's path (sources() puts it there)
        raw, meta = _load_or_tokenize(section, tokenizer, path=path, key=key, limit=limit,
                                      cache_dir=directory, token_print=token_print)
        before = (stats["rows_skipped"], stats["dropped_no_target"])
        for name in ("rows_read", "rows_skipped", "tokenize_seconds"):
            stats[name] += meta[name]
        stats["bad_rows"] += meta["bad_rows"]
        stats["cache_hit"] &= meta["cache_hit"]
        left = section.truncation == "left"
        usable = raw.target_counts(section.max_length, left=left) > 0
        if raw.roles is not None:  # preference data: a response cut away is the row's problem
            usable = usable_rows(section, raw, usable, key=key, path=path, stats=stats)
        keep = np.flatnonzero(usable)
        stats["truncated"] += int(np.count_nonzero(raw.lengths[keep] > section.max_length))
        dropped = len(raw) - len(keep)
        stats["dropped_no_target"] += dropped
        counted[key] = (f"{meta['rows_read']} rows read, "
                        f"{stats['rows_skipped'] - before[0]} skipped as bad, "
                        f"{stats['dropped_no_target'] - before[1]} with no target token left "
                        "after truncation to data.max_length")
        if dropped and (dropped * 2 > len(raw) or not len(keep)):
            raise InputError(f"{key}: {_too_long(section, raw, dropped, path)}")
        return raw.select(keep, max_length=section.max_length, left=left)

    parts = [load(section, key, cfg.max_examples) for key, section in train_sources]
    val: TokenizedSet | None = None
    if cfg.val is not None:
        vals = [load(section, key, None) for key, section in val_sources]
        for (key, section), part in zip(val_sources, vals, strict=True):
            if len(part) == 0:
                raise InputError(f"{key}: no usable examples in {section.train}")
        val = TokenizedSet.concatenate(vals)
    elif cfg.val_ratio > 0:
        halves = [_split(part, cfg.val_ratio, seed, key=key)
                  for part, (key, _) in zip(parts, train_sources, strict=True)]
        parts = [kept for kept, _ in halves]
        val = TokenizedSet.concatenate([held_out for _, held_out in halves])
    for part, (key, section) in zip(parts, train_sources, strict=True):
        if len(part) == 0:
            raise InputError(f"{key}: no usable examples in {section.train} ({counted[key]})")
    train = TokenizedSet.concatenate(parts)
    sources = None
    if cfg.is_mix:
        ends = np.cumsum([len(part) for part in parts]).tolist()
        sources = [MixSource(key, section.train, float(source.weight), start, stop)
                   for (key, section), source, start, stop in zip(
                       train_sources, cfg.train, [0, *ends[:-1]], ends, strict=True)]
    stats.update(train_examples=len(train), train_tokens=train.num_tokens,
                 train_target_tokens=train.num_target_tokens,
                 val_examples=len(val) if val is not None else 0)
    if stats["truncated"]:
        log.info("%d examples were cut to data.max_length=%d", stats["truncated"], cfg.max_length)
    if stats["dropped_no_target"]:
        log.warning("dropped %d examples with no target token within data.max_length=%d "
                    "(their prompts fill it; data.truncation: left keeps the response)",
                    stats["dropped_no_target"], cfg.max_length)
    return DataSplits(train=train, val=val, stats=stats, sources=sources)


def _check_setup(section: DataSection, tokenizer: Any, key: str) -> None:
    """check_format_setup, its message naming the source of a list it concerns."""
    if not key.endswith("]"):
        check_format_setup(section, tokenizer)
        return
    try:
        check_format_setup(section, tokenizer)
    except InputError as err:
        raise InputError(*(f"{key}: {line}" for line in err.lines)) from None


def usable_rows(cfg: DataSection, raw: TokenizedSet, usable: np.ndarray, *, key: str,
                 path: str, stats: dict[str, Any]) -> np.ndarray:
    """Which examples of preference data to keep: a row whose prompt leaves no response token
    within data.max_length is an error naming it (or, with on_bad_row: skip, left out whole:
    a pair loses both sides)."""
    group = raw.group
    whole = usable.reshape(-1, group).all(axis=1)
    bad = np.flatnonzero(~whole)
    if not len(bad):
        return usable
    rows = raw.source_rows[bad * group] if raw.source_rows is not None else bad
    if cfg.on_bad_row == "error":
        fix = ("raise data.max_length" if cfg.truncation == "left" else
               "set data.truncation: left (cuts the start of the prompt, keeps the response), "
               "or raise data.max_length")
        where = _row_locations(cfg, path, key, rows[:3])
        more = f" and {len(bad) - 3} more rows" if len(bad) > 3 else ""
        raise InputError(f"{where}{more}: the prompt leaves no room for the response within "
                         f"data.max_length={cfg.max_length}; {fix}")
    stats["rows_skipped"] += len(bad)
    log.warning("%s: left out %d rows whose prompt fills data.max_length=%d "
                "(data.on_bad_row: skip)", key, len(bad), cfg.max_length)
    return np.repeat(whole, group)


def _row_locations(cfg: DataSection, path: str, key: str, ordinals: np.ndarray) -> str:
    """The locations (`file:line`) of rows by their ordinal in the source."""
    wanted = {int(i) for i in ordinals}
    found: dict[int, str] = {}
    for ordinal, item in enumerate(iter_rows(resolve_source(path, key=key), key=key,
                                             display=path)):
        if ordinal in wanted:
            found[ordinal] = item.location
            if len(found) == len(wanted):
                break
    return ", ".join(found.get(int(i), f"{path}: row {int(i) + 1}") for i in ordinals)


def _too_long(cfg: DataSection, raw: TokenizedSet, dropped: int, path: str) -> str:
    """Why most examples of a file have nothing to train on, and the two ways out."""
    lengths = raw.lengths
    longest, typical = int(lengths.max()), int(np.percentile(lengths, 95))
    fix = (f"raise data.max_length (the longest example has {longest:,} tokens, 95% have "
           f"<= {typical:,})")
    if cfg.truncation == "right" and cfg.format != "text":
        fix += ", or set data.truncation: left to cut the start of long prompts and keep the response"
    return (f"{path}: {dropped} of {len(raw)} examples have no target token within "
            f"data.max_length={cfg.max_length} (their prompts fill it); {fix}")


def _split(data: TokenizedSet, ratio: float, seed: int, *,
           key: str = "data.train") -> tuple[TokenizedSet, TokenizedSet]:
    """A seeded random split; both parts keep file order."""
    group = data.group  # pairs are split as pairs
    units = len(data) // group
    n_val = max(1, round(units * ratio))
    if n_val >= units:
        source = "" if key == "data.train" else f" (of {key})"
        raise InputError(f"data.val_ratio: {ratio} of {units} examples{source} leaves none to "
                         "train on; lower it or give data.val")
    order = np.random.default_rng([seed % 2**63, 0x5A1]).permutation(units)

    def members(chosen: np.ndarray) -> np.ndarray:
        return (np.sort(chosen)[:, None] * group + np.arange(group)).ravel()

    return data.select(members(order[n_val:])), data.select(members(order[:n_val]))


def _load_or_tokenize(cfg: DataSection, tokenizer: Any, *, path: str, key: str,
                      limit: int | None, cache_dir: Path,
                      token_print: str) -> tuple[TokenizedSet, dict[str, Any]]:
    source = resolve_source(path, key=key)
    entry_key = cache.cache_key(cfg, source=cache.source_fingerprint(source),
                                tokenizer=token_print, limit=limit)
    entry = cache.load_entry(cache_dir, entry_key)
    if entry is not None:
        arrays, meta = entry
        log.info("%s: tokenized data loaded from the cache (%s)", key, cache_dir)
        data = TokenizedSet.from_arrays(arrays)
        return data, {**meta, "cache_hit": True, "tokenize_seconds": 0.0}
    began = time.perf_counter()
    data, meta = tokenize_source(cfg, tokenizer, source=source, key=key, display=path, limit=limit)
    meta["tokenize_seconds"] = time.perf_counter() - began
    cache.save_entry(cache_dir, entry_key, data.arrays(), meta)
    return data, {**meta, "cache_hit": False}


def _field_nowhere(cfg: DataSection, key: str, display: str, name: str | None, has: str) -> str:
    """One line for a field that no row has: the field, the key naming it, what rows hold."""
    keys = [k for k in ("text_field", "prompt_field", "input_field", "response_field",
                        "messages_field", "chosen_field", "rejected_field", "completion_field",
                        "label_field") if getattr(cfg, k, None) == name]
    which = (f"{key}.{keys[0]}" if key.endswith("]") else f"data.{keys[0]}") if keys else (
        "the format's field")
    fields = has.removeprefix("the row has: ")
    present = set(fields.split(", "))
    hint = ""
    if cfg.format in ("text", "instruction") and present & {"messages", "conversations"}:
        hint = ", or data.format: chat for conversations"
    elif cfg.format == "text" and len(present) >= 2:
        hint = ", or data.format: instruction with prompt_field and response_field"
    return (f"{key}: {display}: no row has the field '{name}' ({which}, format "
            f"{cfg.format}); the first row's fields: {fields or 'none'}; set {which} to the "
            f"one that holds it{hint}")


def tokenize_source(cfg: DataSection, tokenizer: Any, *, source: Path, key: str, display: str,
                    limit: int | None) -> tuple[TokenizedSet, dict[str, Any]]:
    """Tokenize every good row of one source, collecting bad rows: with on_bad_row: error all
    of them are reported at once (up to MAX_REPORTED_BAD_ROWS lines), with skip they are
    counted and left out."""
    format_fn = get_format(cfg.format)
    encoder = SegmentEncoder(tokenizer)
    chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    pending: list = []
    roles: list[int] = []  # per example, with the row ordinal it came from
    ordinals: list[int] = []
    bad: list[str] = []
    lacking: list[tuple[str | None, str]] = []  # (field, what the row has) per missing field
    rows_read = 0
    for item in iter_rows(source, key=key, display=display, limit=limit):
        rows_read += 1
        try:
            if item.row is None:
                raise RowError(item.problem or "unreadable row")
            segments = format_fn(item.row, cfg, tokenizer)
        except RowError as exc:
            if exc.fatal:
                raise InputError(f"{item.location}: {exc.message}") from None
            bad.append(f"{item.location}: {exc.message}")
            if exc.problem.startswith("missing field"):
                lacking.append((exc.field_name, exc.problem.partition("; ")[2]))
            continue
        if bad and cfg.on_bad_row == "error":
            continue  # the run stops at the end: only look for more bad rows
        examples = segments if isinstance(segments, list) else [segments]
        pending += examples
        roles += [example.role for example in examples]
        ordinals += [rows_read - 1] * len(examples)
        if len(pending) >= _ROWS_PER_BATCH:
            chunks.append(encoder.encode(pending))
            pending = []
    names = {name for name, _ in lacking}
    if bad and len(lacking) == rows_read and len(names) == 1:  # the usual new-dataset mistake
        raise InputError(_field_nowhere(cfg, key, display, names.pop(), lacking[0][1]))
    if bad and cfg.on_bad_row == "error":
        # One line per bad row (the CLI prints each as `error: ...`); the skip hint goes on
        # the summary line, so that a file with one bad row gives exactly one line.
        lines = bad[:MAX_REPORTED_BAD_ROWS]
        if len(bad) > MAX_REPORTED_BAD_ROWS:
            lines.append(f"... and {len(bad) - MAX_REPORTED_BAD_ROWS} more bad rows "
                         "(data.on_bad_row: skip leaves bad rows out)")
        raise InputError(*lines)
    if bad:
        log.warning("%s: skipped %d bad rows of %d (data.on_bad_row: skip); first: %s",
                    key, len(bad), rows_read, bad[0])
    if pending:
        chunks.append(encoder.encode(pending))
    lengths = np.concatenate([c[2] for c in chunks]) if chunks else np.zeros(0, np.int64)
    preference = any(roles)  # every example of a preference format has a role
    data = TokenizedSet(
        np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0, np.int32),
        np.concatenate([c[1] for c in chunks]) if chunks else np.zeros(0, np.int32),
        np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
        roles=np.asarray(roles, dtype=np.int8) if preference else None,
        source_rows=np.asarray(ordinals, dtype=np.int64) if preference else None,
    )
    meta = {"rows_read": rows_read, "rows_skipped": len(bad),
            "bad_rows": bad[:MAX_REPORTED_BAD_ROWS]}
    return data, meta
