"""Build the tiny pipeline's corpus (recipes/tiny/) from text that ships with every Python: no downloads.

Sources: the English prose of the language reference that `pydoc` carries
(`pydoc_data.topics.topics`) and the standard library's own sources
(`sysconfig.get_paths()["stdlib"]`). Writes JSONL files (one object per line, a `text`
field plus a `source` field naming where the text came from) into `--out`:

  pretrain.jsonl         prose sections and library code (no test code), chunked at
                         paragraph / function boundaries into ~200-1500 characters;
                         for pre-training the tiny base model (`recipes/tiny/pretrain.yaml`)
  tests_train.jsonl      the fine-tuning domain: the stdlib's unit tests, chunked at
  tests_val.jsonl        `def test_` boundaries; val comes from other files than train
  instruct_train.jsonl   `prompt` / `response` rows for the `instruction` format:
                         "Explain the Python topic: <title>" -> the topic's first paragraph

The output depends only on `--seed` and the Python version it runs on. Files that fail to
read or decode are skipped. Standard library only, so it runs before peftune is installed.

    python scripts/build_demo_corpus.py --out runs/tiny/data [--seed 0]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import sys
import sysconfig
import textwrap
import time
from collections.abc import Callable, Iterable
from pathlib import Path

MIN_CHARS, MAX_CHARS = 200, 1500  # chunk size: long enough to say something, short enough to vary
TARGET_CHARS = 700                # close a chunk at the first boundary past this size
PROSE_SHARE = 0.2                 # of pretrain docs; the rest is library code
CODE_CHUNKS_PER_FILE = 12         # caps keep a few large modules from dominating
TEST_CHUNKS_PER_FILE = 10
VAL_FILE_SHARE = 0.1              # share of test files held out for validation
MIN_TEST_FILES = 20               # fewer than this: fall back to other code (see finetune_domain)
MAX_LINE_CHARS = 300              # longer lines are data blobs, not code
MAX_NON_ASCII = 0.05              # the byte-level tokenizer spends 2-4 tokens per such char

# Directories never read for library code: tests (the fine-tuning domain), third-party
# packages, generated tables and bundled data.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib-dynload",
             "__pycache__", "encodings", "pydoc_data", "ensurepip", "_bundled", "__phello__"}
BOUNDARY = re.compile(r"^ {0,4}(?:@|def |async def |class )")  # module and method level
TEST_DEF = re.compile(r"^\s*(?:async )?def test_")
DEF_LINE = re.compile(r"^\s*(?:async )?def |^\s*class ")
UNDERLINE = re.compile(r"^([*=\-~^#\"'])\1{2,}$")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the JSONL files to")
    parser.add_argument("--seed", type=int, default=0, help="sampling and shuffling seed")
    parser.add_argument("--max-docs", type=int, default=6000, help="pretrain.jsonl documents")
    parser.add_argument("--max-test-docs", type=int, default=2000, help="tests_train.jsonl documents")
    parser.add_argument("--max-val-docs", type=int, default=80, help="tests_val.jsonl documents")
    args = parser.parse_args(argv)
    for flag in ("max_docs", "max_test_docs", "max_val_docs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")

    start = time.perf_counter()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(args.seed)
    topics = read_topics(stdlib)

    library = library_files(stdlib)
    domain_files, domain_chunker, note = finetune_domain(stdlib, library, rng)
    if note:
        print(f"note: {note}")

    prose = [(text, f"pydoc:{key}") for key, body in topics for text in chunk_prose(body)]
    code = sample_chunks(library, stdlib, chunk_code, CODE_CHUNKS_PER_FILE, rng)
    n_prose = min(len(prose), round(args.max_docs * PROSE_SHARE))
    pretrain = rng.sample(prose, n_prose) + rng.sample(code, min(len(code), args.max_docs - n_prose))
    rng.shuffle(pretrain)
    tests_train, tests_val = split_domain(domain_files, domain_chunker, stdlib, rng,
                                          args.max_test_docs, args.max_val_docs)
    instruct = topic_instructions(topics)
    if not tests_train or not tests_val:
        print(f"error: too little code in {stdlib} for tests_train.jsonl and tests_val.jsonl",
              file=sys.stderr)
        return 1

    args.out.mkdir(parents=True, exist_ok=True)
    outputs = {
        "pretrain.jsonl": [{"text": t, "source": s} for t, s in pretrain],
        "tests_train.jsonl": [{"text": t, "source": s} for t, s in tests_train],
        "tests_val.jsonl": [{"text": t, "source": s} for t, s in tests_val],
        "instruct_train.jsonl": instruct,
    }
    for name, rows in outputs.items():
        size = write_jsonl(args.out / name, rows)
        print(f"{name:22s} {len(rows):6d} docs  {size / 1e6:6.2f} MB")
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s "
          f"(Python {sys.version_info.major}.{sys.version_info.minor}, seed {args.seed})")
    return 0


# --- sources -------------------------------------------------------------------------------

def read_topics(stdlib: Path) -> list[tuple[str, str]]:
    """(topic key, text) of pydoc's topics; module docstrings where pydoc_data is missing."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        print("note: pydoc_data is missing from this Python; using module docstrings as prose")
        found = []
        for path in library_files(stdlib):
            doc = ast.get_docstring(_parse(path) or ast.Module(body=[], type_ignores=[]))
            if doc and len(doc) >= MIN_CHARS:
                name = path.relative_to(stdlib).with_suffix("").as_posix().replace("/", ".")
                found.append((name, f"{name}\n{'*' * len(name)}\n\n{doc}"))
        return found
    return sorted(topics.items())


def library_files(stdlib: Path) -> list[Path]:
    """The standard library's own modules, without tests, third-party code or tables."""
    return [path for path in _python_files(stdlib)
            if not SKIP_DIRS.intersection(path.relative_to(stdlib).parts[:-1])
            and not path.name.startswith("test")]


def finetune_domain(stdlib: Path, library: list[Path], rng: random.Random
                    ) -> tuple[list[Path], Callable[[str], list[str]], str]:
    """The files of the fine-tuning domain, their chunker, and a note when it is a fallback.

    The stdlib's unit tests (Lib/test/**/test_*.py) where present. Some distributions
    (Debian's python3.x without its -testsuite package, slim images) strip Lib/test; then
    test modules elsewhere in the stdlib, then any *test*.py file, and where even those
    are too few, a held-out quarter of the library modules (removed from `library`, so
    that pre-training never sees them).
    """
    outside = [p for p in _python_files(stdlib)
               if not {"site-packages", "dist-packages"}.intersection(p.relative_to(stdlib).parts)]
    tiers = [
        ("", [p for p in _python_files(stdlib / "test") if p.name.startswith("test_")]),
        ("test_*.py files from elsewhere in the stdlib",
         [p for p in outside if p.name.startswith("test_")]),
        ("*test*.py files of the stdlib", [p for p in outside if "test" in p.name]),
    ]
    for what, files in tiers:
        files = [p for p in files if "def test_" in (_read(p) or "")]
        if len(files) >= MIN_TEST_FILES:
            note = (f"{stdlib / 'test'} is missing or stripped in this Python; using "
                    f"{len(files)} {what} for tests_*.jsonl") if what else ""
            return files, chunk_tests, note
    held_out = sorted(rng.sample(library, len(library) // 4))
    library[:] = [p for p in library if p not in set(held_out)]
    return held_out, chunk_code, (
        f"this Python ships almost no test code ({stdlib / 'test'} is stripped); tests_*.jsonl "
        f"hold {len(held_out)} library modules kept out of pretrain.jsonl instead (install "
        "your distribution's python3-testsuite / libpython3.x-testsuite package for the stdlib tests)")


def _python_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        found.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return found


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _parse(path: Path) -> ast.Module | None:
    text = _read(path)
    try:
        return ast.parse(text) if text is not None else None
    except (SyntaxError, ValueError):
        return None


# --- chunking ------------------------------------------------------------------------------

def pack(pieces: Iterable[str], *, breaks: Callable[[str], bool] = lambda piece: False) -> list[str]:
    """Merge consecutive pieces into chunks of MIN_CHARS..MAX_CHARS characters.

    A chunk closes at the first piece boundary past TARGET_CHARS, before a piece that would
    push it past MAX_CHARS, and before a piece for which `breaks` is true (a section
    heading). Pieces longer than MAX_CHARS are split at blank lines, then at lines. A
    remainder shorter than MIN_CHARS that cannot join a neighbour is dropped.
    """
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        for part in _split_long(piece):
            if current and (len(current) + len(part) > MAX_CHARS or breaks(part)):
                if len(current.strip()) >= MIN_CHARS:
                    chunks.append(current)
                current = ""
            current += part
            if len(current) >= TARGET_CHARS:
                chunks.append(current)
                current = ""
    if len(current.strip()) >= MIN_CHARS:
        chunks.append(current)
    return chunks


def _split_long(text: str) -> list[str]:
    if len(text) <= MAX_CHARS:
        return [text]
    parts = [part for part in re.split(r"(?<=\n\n)", text) if part]
    if len(parts) == 1:
        parts = text.splitlines(keepends=True)
    if len(parts) == 1:  # one very long line
        return [text[i:i + MAX_CHARS] for i in range(0, len(text), MAX_CHARS)]
    return [piece for part in parts for piece in _split_long(part)]


def chunk_prose(text: str) -> list[str]:
    """A topic's paragraphs, packed; each section heading starts a new chunk."""
    paragraphs = [p.strip("\n") + "\n\n" for p in re.split(r"\n\s*\n", text) if p.strip()]
    return [c.strip() for c in pack(paragraphs, breaks=_is_heading) if _clean(c)]


def _is_heading(paragraph: str) -> bool:
    lines = paragraph.strip("\n").splitlines()
    return len(lines) >= 2 and bool(UNDERLINE.match(lines[1].strip()))


def _segments(text: str, starts: Callable[[int, list[str]], bool]) -> list[str]:
    """Split source lines before every line where `starts(i, lines)` is true."""
    lines = text.splitlines(keepends=True)
    segments, current = [], []
    for i in range(len(lines)):
        if current and starts(i, lines):
            segments.append("".join(current))
            current = []
        current.append(lines[i])
    if current:
        segments.append("".join(current))
    return segments


def _starts_definition(i: int, lines: list[str]) -> bool:
    # A decorator belongs to the definition below it: split before the first decorator only.
    return bool(BOUNDARY.match(lines[i])) and not (i > 0 and lines[i - 1].lstrip().startswith("@"))


def chunk_code(text: str) -> list[str]:
    """Library source split at module- and method-level definitions, packed."""
    chunks = pack(_segments(text, _starts_definition))
    return [c for c in (textwrap.dedent(c).strip("\n") for c in chunks) if _clean(c)]


def chunk_tests(text: str) -> list[str]:
    """One or more consecutive `def test_...` functions (with their decorators) per chunk."""
    segments = _segments(text, _starts_definition)
    tests = [s for s in segments if TEST_DEF.match(_first_code_line(s))]
    return [c for c in (textwrap.dedent(c).strip("\n") for c in pack(tests)) if _clean(c)]


def _first_code_line(segment: str) -> str:
    for line in segment.splitlines():
        if DEF_LINE.match(line):
            return line
        if line.strip() and not line.lstrip().startswith(("@", "#")):
            return line
    return ""


def _clean(chunk: str) -> bool:
    """Text a byte-level model should learn from: no data blobs, mostly ASCII, not tiny."""
    if len(chunk) < MIN_CHARS:
        return False
    if max(len(line) for line in chunk.splitlines()) > MAX_LINE_CHARS:
        return False
    return sum(ord(ch) > 127 for ch in chunk) <= MAX_NON_ASCII * len(chunk)


def sample_chunks(files: list[Path], root: Path, chunker: Callable[[str], list[str]],
                  per_file: int, rng: random.Random) -> list[tuple[str, str]]:
    """(chunk, relative path) for up to `per_file` chunks of each readable file."""
    found = []
    for path in files:
        text = _read(path)
        if text is None:
            continue
        chunks = chunker(text)
        if len(chunks) > per_file:
            chunks = rng.sample(chunks, per_file)
        found.extend((chunk, path.relative_to(root).as_posix()) for chunk in chunks)
    return found


def split_domain(files: list[Path], chunker: Callable[[str], list[str]], root: Path,
                 rng: random.Random, max_train: int, max_val: int,
                 ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Train and val chunks of the fine-tuning domain, from disjoint sets of files."""
    files = list(files)
    rng.shuffle(files)
    n_val_files = max(1, round(len(files) * VAL_FILE_SHARE)) if len(files) > 1 else 0
    val = sample_chunks(files[:n_val_files], root, chunker, TEST_CHUNKS_PER_FILE, rng)
    train = sample_chunks(files[n_val_files:], root, chunker, TEST_CHUNKS_PER_FILE, rng)
    val = rng.sample(val, min(len(val), max_val))
    train = rng.sample(train, min(len(train), max_train))
    return train, val


def topic_instructions(topics: list[tuple[str, str]]) -> list[dict[str, str]]:
    """One `prompt`/`response` row per titled section: its first paragraph of prose."""
    rows, seen = [], set()
    for key, text in topics:
        paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]
        title = None
        for i, paragraph in enumerate(paragraphs):
            if _is_heading(paragraph):
                title = paragraph.splitlines()[0].strip()
                continue
            # The first unindented paragraph after a heading; indented ones are grammar or code.
            if title and not paragraph.startswith(" ") and title not in seen:
                seen.add(title)
                response = " ".join(line.strip() for line in paragraph.splitlines())
                following = paragraphs[i + 1] if i + 1 < len(paragraphs) else ""
                if response.endswith(":") and following.startswith(" "):
                    # "...is defined as follows:" reads badly without what follows.
                    response += "\n\n" + textwrap.dedent(following)
                rows.append({"prompt": f"Explain the Python topic: {title}",
                             "response": response, "source": f"pydoc:{key}"})
                title = None
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> int:
    """Write rows atomically (temp file + rename); return the size in bytes."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path.stat().st_size


if __name__ == "__main__":
    sys.exit(main())
