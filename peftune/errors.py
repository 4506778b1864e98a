"""User-facing errors. `InputError` is bad input (recipe, data, paths, flags): the CLI prints
its lines, one problem each, and exits with code 2 and no traceback."""

from __future__ import annotations


class InputError(Exception):
    """One or more problems with what the user gave us, each an actionable line.

    In a multi-process run (peftune/dist.py) an error found on one rank is raised on every
    rank: `shown_by_main` marks the copies that rank 0 prints (the other ranks exit quietly),
    `from_rank` the rank that found it."""

    def __init__(self, *lines: str, shown_by_main: bool = False, from_rank: int | None = None):
        self.lines = [line for line in lines if line]
        self.shown_by_main = shown_by_main
        self.from_rank = from_rank
        super().__init__("\n".join(self.lines))


class TrainingError(Exception):
    """A run that started correctly but cannot go on (e.g. a non-finite loss)."""
