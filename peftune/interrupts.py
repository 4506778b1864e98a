"""Ctrl-C (SIGINT) and SIGTERM in every verb: one line on stderr saying what was (not)
written and how to go on, and the exit code 128 + the signal (130, 143), never a traceback.

Inside the training loop the signals are only recorded (`peftune.train.checkpoint.StopRequest`)
and the run stops at the next step boundary with a checkpoint (`RunInterrupted`). Everywhere
else `signals_raise` turns both into `Interrupted` where the main thread is, so the verbs'
own `finally` blocks remove their temporary output before the line is printed.

Importing this module imports neither torch nor accelerate.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LAUNCH_FLAGS = "PEFTUNE_LAUNCH_FLAGS"  # `--nproc N ...` of a relaunched run, for the hint


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


def rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def say(line: str) -> None:
    """One line on stderr, from rank 0 only (every rank stopped for the same reason)."""
    if rank0():
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


def resume_command(recipe: Path, overrides: list[str] | None) -> str:
    """The command that continues a run, with the launch flags it was started with."""
    args = ["peftune", "train", str(recipe), *(overrides or []), "--resume"]
    command = " ".join(shlex.quote(a) for a in args)
    flags = os.environ.get(LAUNCH_FLAGS)
    if flags:
        return f"{command} {flags}"
    from peftune.train.launch import launched

    return f"the same launch command with {command}" if launched() else command


def remember_launch_flags(processes: int | None, config: Path | None) -> None:
    """Before relaunching: the flags `resume_command` adds to its hint, for every rank."""
    flags = [*(["--nproc", str(processes)] if processes else []),
             *(["--accelerate-config", str(config)] if config else [])]
    os.environ[LAUNCH_FLAGS] = " ".join(shlex.quote(f) for f in flags)


def train_interrupted(stop: BaseException, *, recipe: Path, overrides: list[str] | None,
                      out: Path, resume: bool) -> int:
    """Say how an interrupted `peftune train` stopped and return its exit code: at a step
    boundary with a checkpoint (`RunInterrupted`), or before the loop began."""
    from peftune.train.checkpoint import RunInterrupted

    if isinstance(stop, RunInterrupted):
        resumable = getattr(stop, "resumable", True)  # not after the export, in the eval
        say(f"{stop}; resume with {resume_command(recipe, overrides)}" if resumable
            else str(stop))
        return stop.exit_code
    signum = interrupt_signum(stop)  # while loading or tokenizing
    if resume:
        then = f"its checkpoints are as they were; resume with {resume_command(recipe, overrides)}"
    else:
        again = " with --overwrite" if out.is_dir() and any(out.iterdir()) else ""
        then = f"no checkpoint was written; start it again{again}"
    say(f"interrupted ({signal.Signals(signum).name}) before training began: {then}")
    return 128 + signum
