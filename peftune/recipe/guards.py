"""Guards on recipe input before and beside schema validation: the recipe file's bytes
(UTF-8 only, one line for anything else), values no run can reach (integers beyond 64 bits,
ceilings on counts and sizes), and the output-directory policy. Torch-free, like the loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftune.errors import InputError
from peftune.recipe.errors import Locations, Problem, locate, show

if TYPE_CHECKING:
    from peftune.recipe.schema import Recipe


def output_dir_problem(value: str) -> str | None:
    """Why `value` cannot be a run's output directory, or None.

    The policy: output.dir may be relative (to the current directory) or absolute, and may
    contain `..`; what counts is where it resolves (symbolic links followed). It must be a
    new directory, an empty one, or an earlier run's (it holds recipe.yaml), and never the
    filesystem root, the home directory, the current directory or one above it, or the root
    of a git repository: `--overwrite` deletes the directory it replaces.
    """
    hint = "; name a new directory for the run, such as runs/my-run"
    if not value.strip():
        return f"is empty{hint}"
    out = Path(value).expanduser()
    try:
        resolved = out.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return f"{value} is a symbolic link loop{hint}"
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    named = {Path(resolved.anchor): "the filesystem root", home: "the home directory",
             cwd: "the current directory"}
    if resolved in named:
        return f"{value} is {named[resolved]} ({resolved}){hint}"
    if resolved in cwd.parents:
        return f"{value} resolves to {resolved}, above the current directory{hint}"
    try:
        if (resolved / ".git").exists():
            return f"{value} is the root of a git repository ({resolved}){hint}"
        if out.is_symlink() and not out.exists():
            return f"{value} is a broken symbolic link{hint}"
        if out.exists() and not out.is_dir():
            return f"{value} exists and is not a directory{hint}"
        if out.is_dir() and any(out.iterdir()) and not (out / "recipe.yaml").is_file():
            return (f"{value} is an existing directory that is not a peftune run (no "
                    f"recipe.yaml){hint}")
    except OSError as err:
        return f"{value}: cannot inspect it ({err.strerror or err}){hint}"
    return None


def read_recipe_text(path: Path, shown: str) -> str:
    """The recipe's text: UTF-8 (a leading BOM is dropped); anything else is one line that
    names the file, the line and the fix."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        why = " (a broken symbolic link)" if path.is_symlink() else ""
        raise InputError(f"{shown}: no such recipe file{why}") from None
    except IsADirectoryError:
        raise InputError(f"{shown}: is a directory, not a recipe file") from None
    except PermissionError:
        raise InputError(f"{shown}: cannot read the recipe (permission denied); check the "
                         "file's permissions") from None
    except OSError as err:  # a symlink loop, an I/O error
        raise InputError(f"{shown}: cannot read the recipe: {err.strerror or err}") from None
    for bom, encoding in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                          (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if raw.startswith(bom):
            raise InputError(f"{shown}: the recipe is {encoding}-encoded; save it as UTF-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(f"{shown}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x}); save "
                         "the recipe as UTF-8") from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise InputError(f"{shown}:{line}: a NUL byte: this is not a text file")
    return text.removeprefix("\ufeff")


# Values no run can reach, refused up front rather than left to overflow a counter, size a
# tensor or loop for ever: (key, largest accepted, why).
_CEILINGS = (
    (("train", "max_steps"), 10**9, "a billion optimizer steps"),
    (("train", "epochs"), 10**6, "a million passes over the data"),
    (("train", "batch_size"), 2**20, "examples per micro-batch"),
    (("train", "grad_accum"), 2**20, "micro-batches per step"),
    (("data", "max_length"), 2**24, "tokens per example; no model has a longer context"),
)
_INT64 = 2**63 - 1


def ceiling_problems(recipe: Recipe, where: Locations) -> list[Problem]:
    problems = []
    for path, ceiling, why in _CEILINGS:
        value = getattr(getattr(recipe, path[0]), path[1], None)
        if isinstance(value, (int, float)) and value > ceiling:
            problems.append(Problem(locate(path, where), path,
                                    f"{show(value)} is too large (at most {ceiling:,}: {why})"))
    return problems


def too_large(data: Any, where: Locations) -> list[Problem]:
    """Integers that do not fit 64 bits, wherever they are in the recipe: numpy and torch
    would overflow on them (seeds, counts, sizes)."""
    problems = []
    for path in value_paths(data, ()):
        node = data
        for part in path:
            node = node[part]
        if isinstance(node, int) and not isinstance(node, bool) and abs(node) > _INT64:
            problems.append(Problem(locate(path, where), path,
                                    f"{node} is too large (integers must fit 64 bits: at "
                                    f"most {_INT64:,})"))
    return problems


def value_paths(value: Any, prefix: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Every key and list-index path inside `value`, below `prefix` (not `prefix` itself)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    out = []
    for key, child in items:
        out.append(prefix + (key,))
        out += value_paths(child, prefix + (key,))
    return out
