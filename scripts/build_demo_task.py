"""Build the demo's task from the standard library's own sources: no downloads.

The question: "Which module of the Python standard library defines the function
`nsmallest(n, iterable, key)`? Its docstring begins: "Find the n smallest elements in a
dataset." ..." with the module's import name as the answer (`heapq`). The functions are
the public, documented, module-level `def`s of the stdlib's public modules, read with
`ast` from `sysconfig.get_paths()["stdlib"]` (nothing is imported or run). Writes two
JSONL files of `chat` rows (`messages`: the user's question, the assistant's answer; plus
`module` and `function` fields saying where the row came from) into `--out`:

  train.jsonl     questions about functions of the stdlib's modules: first a few of every
                  module a held-out question asks about, then a few of every other module
  heldout.jsonl   questions about OTHER functions (of modules training covers): a held-out
                  function is never the subject of a training question, so a model scores
                  here only by placing a function it was not taught, from its name,
                  signature and docstring

Left out, so that every question has one right answer that the prompt does not give away:
functions whose name is defined in more than one public module, docstrings that name the
module or the function, private modules (`_pydecimal`) and the platform twins of `os.path`
(`ntpath`; `posixpath` and `genericpath` are asked as `os.path`). The output depends only
on `--seed` and the Python version it runs on. Standard library only.

    python scripts/build_demo_task.py --out runs/demo/data [--seed 0] [--train 240] [--heldout 40]
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import re
import sys
import sysconfig
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling corpus builder
from build_demo_corpus import write_jsonl  # noqa: E402 - atomic JSONL, stdlib only

# Not questions a user of the standard library asks: tests, GUI internals, demos, bundled
# installers and tables, and third-party packages.
SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages",
             "dist-packages", "lib-dynload", "__pycache__", "encodings", "pydoc_data",
             "ensurepip", "_bundled", "__phello__", "lib2to3"}
# posixpath is what `os.path` is on POSIX (genericpath holds what it shares with ntpath):
# a user imports it as os.path. The Windows twins would make every path question ambiguous.
ALIASES = {"posixpath": "os.path", "genericpath": "os.path"}
SKIP_MODULES = {"ntpath", "nturl2path", "this", "antigravity", "__main__", "__future__"}
MIN_SUMMARY, MAX_SUMMARY = 20, 160   # characters of the docstring's first paragraph
HELDOUT_PER_MODULE = 2   # many modules, not a few large ones, in the held-out set
MIN_TRAIN_SIBLINGS = 3   # a held-out function's module has this many other functions to learn from
TRAIN_PER_HELDOUT_MODULE = 5  # training questions taken first from each held-out question's module

PROMPT = ("Which Python standard-library module defines `{signature}`, documented as "
          "\"{summary}\"? Answer with the module name only.")


@dataclass(frozen=True)
class Function:
    module: str     # the import name: os.path, xml.etree.ElementTree
    name: str
    signature: str  # name(arg, *args, key, **kwargs): names only, no defaults
    summary: str    # the docstring's first paragraph, on one line

    def row(self) -> dict:
        question = PROMPT.format(signature=self.signature, summary=self.summary)
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": self.module}],
                "module": self.module, "function": self.name}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the JSONL files to")
    parser.add_argument("--seed", type=int, default=0, help="which modules are held out; row order")
    parser.add_argument("--train", type=int, default=240, help="at most this many train.jsonl rows")
    parser.add_argument("--heldout", type=int, default=40, help="heldout.jsonl rows")
    args = parser.parse_args(argv)
    problem = _check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    functions = stdlib_functions(stdlib)
    train, heldout = split_by_function(functions, random.Random(args.seed),
                                     n_train=args.train, n_heldout=args.heldout)
    if len(heldout) < args.heldout or not train:
        print(f"error: {stdlib} has too few documented functions ({len(functions)}) for "
              f"{args.heldout} held-out questions and a training set; lower --heldout",
              file=sys.stderr)
        return 1

    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
            write_jsonl(args.out / name, [f.row() for f in rows])
    except OSError as err:  # a read-only or special file system the checks above cannot see
        print(f"error: --out {args.out}: cannot write there ({err.strerror}); choose another path",
              file=sys.stderr)
        return 2
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        modules = len({f.module for f in rows})
        print(f"{name:14s} {len(rows):4d} questions about {modules:3d} modules")
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s from {len(functions)} "
          f"documented functions (Python {sys.version_info.major}.{sys.version_info.minor}, "
          f"seed {args.seed})")
    return 0


def _check_args(args: argparse.Namespace) -> str | None:
    if args.train < 1:
        return f"--train must be at least 1, got {args.train}"
    if args.heldout < 1:
        return f"--heldout must be at least 1, got {args.heldout}"
    if args.out.exists() and not args.out.is_dir():
        return f"--out {args.out}: exists and is not a directory; choose another path"
    parent = next((p for p in (args.out, *args.out.parents) if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"--out {args.out}: {parent} is not a directory; choose another path"
    if parent is not None and not os.access(parent, os.W_OK):
        return f"--out {args.out}: {parent} is not writable; choose another path"
    return None


# --- reading the standard library ----------------------------------------------------------

def stdlib_functions(stdlib: Path) -> list[Function]:
    """Every usable question, sorted by module and name."""
    parsed = [(module, tree) for path, module in public_modules(stdlib)
              if (tree := _parse(path)) is not None]
    exported = reexports(dict(parsed))
    found: dict[tuple[str, str], Function] = {}
    for module, tree in parsed:  # posixpath and genericpath are both os.path
        for node in tree.body:
            function = _function(node, module)
            if function is not None:
                # asyncio.tasks.gather is asked as asyncio.gather: what a user imports
                home = exported.get((module, function.name), module)
                if home != module:
                    function = _function(node, home)
                if function is not None:
                    found.setdefault((home, function.name), function)
    modules_of = defaultdict(set)
    for module, name in found:
        modules_of[name].add(module)
    # `open` lives in io, gzip, bz2, codecs, ...: a question without one right answer.
    return sorted((f for (module, name), f in found.items() if len(modules_of[name]) == 1),
                  key=lambda f: (f.module, f.name))


def public_modules(stdlib: Path) -> list[tuple[Path, str]]:
    """(file, import name) of the stdlib's public modules: no part of the name starts with _."""
    found = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("_")
                             and "-" not in d and "." not in d)
        package = Path(dirpath).relative_to(stdlib).parts
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            stem = filename[:-3]
            parts = package if stem == "__init__" else (*package, stem)
            if not parts or any(p.startswith("_") for p in parts):
                continue
            module = ".".join(parts)
            if module in SKIP_MODULES or not all(p.isidentifier() for p in parts):
                continue
            found.append((Path(dirpath) / filename, ALIASES.get(module, module)))
    return found


def reexports(trees: dict[str, ast.Module]) -> dict[tuple[str, str], str]:
    """(submodule, name) -> package, for the names a package's __init__ imports from its
    submodules (`from .tasks import *` in asyncio, `from .case import TestCase` in unittest)."""
    found = {}
    for package, tree in trees.items():
        for node in tree.body:
            if not isinstance(node, ast.ImportFrom) or node.level != 1 or not node.module:
                continue
            submodule = f"{package}.{node.module}"
            if any(alias.name == "*" for alias in node.names):
                sub = trees.get(submodule)
                names = [n.name for n in sub.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))] if sub else []
            else:
                names = [alias.name for alias in node.names if alias.asname is None]
            found.update({(submodule, name): package for name in names})
    return found


def _function(node: ast.stmt, module: str) -> Function | None:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
        return None
    doc = ast.get_docstring(node)
    if not doc:
        return None
    summary = " ".join(re.split(r"\n\s*\n", doc.strip())[0].split())
    if not MIN_SUMMARY <= len(summary) <= MAX_SUMMARY or not summary.isascii():
        return None
    # The answer (or the asked function) spelled out in its own docstring gives it away.
    if gives_away(summary, module) or node.name.lower() in _words(summary):
        return None
    return Function(module=module, name=node.name, signature=_signature(node), summary=summary)


def gives_away(text: str, module: str) -> bool:
    """Whether `text` names the module: a part of its name as a word (`base64`, `etree`), or
    for os.path, which every path function's docstring mentions, the whole name."""
    if module in ALIASES.values():
        return module in text.lower()
    return any(part.lower() in _words(text) for part in module.split("."))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9_]+", text.lower()))


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args]
    if a.vararg:
        names.append(f"*{a.vararg.arg}")
    elif a.kwonlyargs:
        names.append("*")
    names += [x.arg for x in a.kwonlyargs]
    if a.kwarg:
        names.append(f"**{a.kwarg.arg}")
    return f"{node.name}({', '.join(names)})"


def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return None


# --- the split -----------------------------------------------------------------------------

def split_by_function(functions: list[Function], rng: random.Random, *, n_train: int,
                      n_heldout: int) -> tuple[list[Function], list[Function]]:
    """Held-out questions about functions drawn at random (at most HELDOUT_PER_MODULE per
    module, from modules with at least MIN_TRAIN_SIBLINGS other functions), training
    questions (at most n_train, a few of every module) about the other functions: the
    same modules, never the same function."""
    by_module: dict[str, list[Function]] = defaultdict(list)
    for function in functions:
        by_module[function.module].append(function)
    candidates = [f for module in sorted(by_module) if len(by_module[module]) > MIN_TRAIN_SIBLINGS
                  for f in by_module[module]]
    rng.shuffle(candidates)
    heldout: list[Function] = []
    per_module: dict[str, int] = defaultdict(int)
    for function in candidates:
        if len(heldout) < n_heldout and per_module[function.module] < HELDOUT_PER_MODULE:
            heldout.append(function)
            per_module[function.module] += 1
    held = set(heldout)
    rest = {module: [f for f in rng.sample(fs, len(fs)) if f not in held]
            for module, fs in sorted(by_module.items())}
    train: list[Function] = []
    # First up to TRAIN_PER_HELDOUT_MODULE functions of each held-out question's module (what
    # there is to learn a module's kind of function from), then round-robin over every module,
    # so that no large module (inspect has 40 functions) crowds out the rest.
    asked = sorted({f.module for f in heldout})
    for _ in range(TRAIN_PER_HELDOUT_MODULE):
        for module in asked:
            if rest[module] and len(train) < n_train:
                train.append(rest[module].pop())
    while len(train) < n_train and any(rest.values()):
        for module in sorted(rest):
            if rest[module] and len(train) < n_train:
                train.append(rest[module].pop())
    rng.shuffle(train)
    return train, heldout


if __name__ == "__main__":
    sys.exit(main())
