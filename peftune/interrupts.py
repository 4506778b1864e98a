"""Ctrl-C (SIGINT) and SIGTERM in every verb: one line on stderr saying what was (not)
written and how to go on, and the exit code 128 + the signal (130, 143), never a traceback.

Inside the training loop the signals are only recorded and the run stops at the next step
boundary with a checkpoint: that, and what `peftune train` says when stopped, is training's
own (`peftune.train.interrupts`). Everywhere else `signals_raise` turns both into
`Interrupted` where the main thread is, so the verbs' own `finally` blocks remove their
temporary output before the line is printed.

Importing this module imports neither torch nor accelerate.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peftune import dist


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the main thread was (`signals_raise`); `signum` gives
    the exit code (128 + it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt_signum(err: BaseException) -> int:
    return getattr(err, "signum", signal.SIGINT)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While active, SIGTERM raises `Interrupted` as SIGINT does (by default it kills the
    process at once, leaving temporary files behind). A signal inherited as ignored stays so."""

    def handle(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class VerbInterrupted(Exception):
    """Raised by `interruptible` after its line is printed; `exit_code` is 128 + the signal."""

    def __init__(self, exit_code: int):
        super().__init__(exit_code)
        self.exit_code = exit_code


def say(line: str) -> None:
    """One line on stderr, from rank 0 only (every rank stopped for the same reason)."""
    if dist.is_main():
        print(line, file=sys.stderr)


@contextlib.contextmanager
def interruptible(verb: str, out: Path | str | None) -> Iterator[None]:
    """A verb that writes `out` (eval, merge, select-data): interrupted, it says that nothing
    was written there (its own cleanup removed the temporary files) and exits 128 + signal."""
    try:
        with signals_raise():
            yield
    except KeyboardInterrupt as stop:
        signum = interrupt_signum(stop)
        out = getattr(stop, "out", None) or out
        where = (f"nothing was written to {out}" if out is not None
                 else "its output directory was left as it was")
        say(f"interrupted ({signal.Signals(signum).name}): peftune {verb} stopped; {where}")
        raise VerbInterrupted(128 + signum) from None
