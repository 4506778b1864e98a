"""SIGINT and SIGTERM in `peftune train`: the run stops at the next step boundary with a
checkpoint, and says in one line how to resume it.

While the loop runs, `StopRequest` only records a signal; the loop ends after the current
optimizer step and the run raises `RunInterrupted` (a checkpoint of that step is saved). While
a checkpoint is written, `signals_held` blocks both in the writing thread so that no system
call of the write is cut short. After the last step, a signal during the export or the
recipe's eval raises `FinishInterrupted`. `train_interrupted` turns any of them (or a signal
before the loop began) into the line and the exit code, 128 + the signal.

The generic pieces (`Interrupted`, `signals_raise`, `interrupt_signum`) are in
peftune/interrupts.py. Importing this module imports neither torch nor accelerate.
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

from peftune import dist
from peftune.interrupts import interrupt_signum, say

LAUNCH_FLAGS = "PEFTUNE_LAUNCH_FLAGS"  # `--nproc N ...` of a relaunched run, for the hint


class RunInterrupted(Exception):  # noqa: N818 - not an error: the user asked to stop
    """The run stopped on SIGINT/SIGTERM after a whole optimizer step and saved a checkpoint."""

    resumable = True  # `--resume` continues it (the hint says so)

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        super().__init__(f"interrupted ({signal.Signals(signum).name}) at step {step}; "
                         f"checkpoint saved to {checkpoint}")


class FinishInterrupted(RunInterrupted):
    """SIGINT/SIGTERM after the last optimizer step: while exporting or evaluating."""

    def __init__(self, signum: int, step: int, checkpoint: Path, what: str, *,
                 resumable: bool = True):
        super().__init__(signum, step, checkpoint)
        self.resumable = resumable  # not in the eval after the export: the run is whole
        self.args = (f"interrupted ({signal.Signals(signum).name}) {what}",)


class StopRequest:
    """While active, SIGINT and SIGTERM ask the loop to stop at the next step boundary
    instead of killing the process; a second signal only says the stop is under way.
    A signal the process inherited as ignored (a background job's SIGINT) stays ignored.
    `announce`: print those notices (rank 0 of a multi-process run only)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, *, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.announce:
            self.signum = signum if self.signum is None else self.signum
        elif self.signum is None:
            self.signum = signum
            print(f"\n{signal.Signals(signum).name}: stopping after the current optimizer step "
                  "and saving a checkpoint", file=sys.stderr, flush=True)
        else:
            print(f"{signal.Signals(signum).name}: already stopping; the checkpoint is being "
                  "saved (kill -9 stops at once; the previous checkpoint stays usable)",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Block SIGINT/SIGTERM in the writing (main) thread while a checkpoint is written, so no
    system call of the write is cut short by one (EINTR). A signal sent to the process still
    reaches StopRequest's handler, which only records it; one sent to this thread waits."""
    can = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if can:
        signal.pthread_sigmask(signal.SIG_BLOCK, StopRequest.SIGNALS)
    try:
        yield
    finally:
        if can:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, StopRequest.SIGNALS)


def signals_recorded(err: BaseException) -> StopRequest:
    """While active (after `err`, a first signal), a further SIGINT/SIGTERM only says the stop
    is under way."""
    hold = StopRequest()
    hold.signum = interrupt_signum(err)
    return hold


# ---- what `peftune train` says when it stopped ----------------------------------------------

def remember_launch_flags(processes: int | None, config: Path | None) -> None:
    """Before relaunching: the flags `resume_command` adds to its hint, for every rank."""
    flags = [*(["--nproc", str(processes)] if processes else []),
             *(["--accelerate-config", str(config)] if config else [])]
    os.environ[LAUNCH_FLAGS] = " ".join(shlex.quote(f) for f in flags)


def resume_command(recipe: Path, overrides: list[str] | None) -> str:
    """The command that continues a run, with the launch flags it was started with."""
    args = ["peftune", "train", str(recipe), *(overrides or []), "--resume"]
    command = " ".join(shlex.quote(a) for a in args)
    flags = os.environ.get(LAUNCH_FLAGS)
    if flags:
        return f"{command} {flags}"
    return f"the same launch command with {command}" if dist.launched() else command


def train_interrupted(stop: BaseException, *, recipe: Path, overrides: list[str] | None,
                      out: Path, resume: bool) -> int:
    """Say how an interrupted `peftune train` stopped and return its exit code: at a step
    boundary with a checkpoint (`RunInterrupted`), or before the loop began."""
    if isinstance(stop, RunInterrupted):
        say(f"{stop}; resume with {resume_command(recipe, overrides)}" if stop.resumable
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
