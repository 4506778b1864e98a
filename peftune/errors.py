"""User-facing errors. `InputError` is bad input (recipe, data, paths, flags): the CLI prints
its lines, one problem each, and exits with code 2 and no traceback."""

from __future__ import annotations


class InputError(Exception):
    """One or more problems with what the user gave us, each an actionable line."""

    def __init__(self, *lines: str):
        self.lines = [line for line in lines if line]
        super().__init__("\n".join(self.lines))


class TrainingError(Exception):
    """A run that started correctly but cannot go on (e.g. a non-finite loss)."""
