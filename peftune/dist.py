"""Processes and ranks: every rule about a run of several processes (torchrun, `accelerate
launch`, `peftune train --nproc N`) in one place.

    reading       `world_size`, `rank`, `local_rank`, `is_main`, `launched`, `rank_prefix`:
                  this process's place, read from the launcher's environment, nothing else
    the group     `Ranks` (eval and select-data: share the work, gather the results),
                  `process_state` (training's, through Accelerate), `leave_process_group`
    collectives   `run_on_main`, `main_first`, `agree`, `any_rank`: every rank calls them at
                  the same point. An InputError raised on one rank is raised on every rank,
                  marked `shown_by_main` on all but rank 0, so that rank 0 alone prints it
    leaving       `found_on_every_rank`, `wait_for_main_to_report`, `exit_process`

The process group gets a long timeout (PEFTUNE_DIST_TIMEOUT seconds, default 24 h) so that a
rank waiting for the main one's preprocessing (tokenizing into the data cache) never times out.

Importing this module imports neither torch nor accelerate.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from peftune.errors import InputError

# How long a rank other than 0 waits, after a bad-input error that rank 0 prints, for the
# launcher to end it once rank 0 has exited with the error (seconds; it exits itself after).
QUIET_RANK_WAIT_S = 60.0

DEFAULT_TIMEOUT_S = 24 * 3600  # PEFTUNE_DIST_TIMEOUT


# ---- reading: this process's place (the launcher's environment; no side effects) ----------

def world_size() -> int:
    """The number of processes of this job (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank among all the job's processes (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on this machine (its GPU), 0 when not launched."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that judges the output, writes the files and speaks."""
    return rank() == 0


def launched() -> bool:
    """True inside a process started by a launcher (torchrun, accelerate launch)."""
    return "LOCAL_RANK" in os.environ or world_size() > 1


def rank_prefix() -> str:
    """'rank N: ' on a process other than rank 0 of a multi-process run, else ''."""
    return f"rank {rank()}: " if launched() and not is_main() else ""


# ---- the process group ---------------------------------------------------------------------

class Ranks:
    """This process's place under torchrun or `accelerate launch` (WORLD_SIZE > 1), else 0 of
    1. Made under a launcher, it joins the process group unless this process already has:
    NCCL on a machine with a GPU, gloo without one, or `backend` when given (select-data's
    gathers are of CPU objects: gloo)."""

    def __init__(self, *, backend: str | None = None) -> None:
        self.world = world_size()
        self.rank = rank()
        self.local_rank = local_rank()
        if self.world > 1:
            import torch
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
            self._dist = dist

    def mine(self, batches: list) -> list:
        """This rank's share of a plan of batches: r, r + W, ..."""
        return batches[self.rank::self.world]

    def gather(self, value: Any) -> list:
        """Every rank's `value`, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        out: list = [None] * self.world
        self._dist.all_gather_object(out, value)
        return out

    def device(self) -> Any:
        """This rank's GPU (by its local rank), or the CPU."""
        import torch

        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")


def process_state() -> Any:
    """Accelerate's process state (PartialState), creating the process group (when launched
    with several processes) with a long timeout: ranks wait for the main one's tokenizing at
    a collective."""
    from datetime import timedelta

    from accelerate.state import PartialState

    from peftune.compat import accelerate_process_state_exists
    from peftune.device import has_cuda

    if accelerate_process_state_exists():
        return PartialState()
    seconds = float(os.environ.get("PEFTUNE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    # Without a GPU, Accelerate forms a multi-process (gloo) group only when told cpu=True.
    return PartialState(cpu=not has_cuda(), timeout=timedelta(seconds=seconds))


def leave_process_group() -> None:
    """Destroy this process's process group, if it has one: exiting with the group's threads
    alive can abort the process (SIGABRT) and lose its exit code."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available():
        return
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- collectives: every rank calls them at the same point ----------------------------------
# `state` is Accelerate's process state or an Accelerator (num_processes, is_main_process,
# process_index, device, reduce); None stands for one process.

def run_on_main(state: Any | None, fn: Callable[[], Any], *, share_result: bool = False) -> Any:
    """Run `fn` on the main process only, the others waiting. An InputError it raises is
    raised on every rank; its result reaches every rank when `share_result` (else None)."""
    if state is None or state.num_processes == 1:
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    if state.is_main_process:
        try:
            outcome = ("ok", fn())
        except InputError as err:
            outcome = ("error", err.lines)
        sent = outcome if share_result or outcome[0] == "error" else ("ok", None)
        _broadcast(state, sent)
    else:
        outcome = _broadcast(state, None)
    if outcome[0] == "error":
        if state.is_main_process:
            raise InputError(*outcome[1])
        raise _shared_error(outcome[1], from_rank=0, state=state)
    return outcome[1] if (share_result or state.is_main_process) else None


def main_first(state: Any, fn: Callable[[], Any]) -> Any:
    """Run `fn` on the main process first (tokenizing into the cache), then on the others
    (reading it). An InputError on any rank is raised on every rank."""
    if state.num_processes == 1:
        return fn()
    result = run_on_main(state, fn, share_result=False)
    return agree(state, fn) if not state.is_main_process else agree(state, lambda: result)


def agree(state: Any, fn: Callable[[], Any]) -> Any:
    """Every rank runs `fn` (which must hold no collective); when any rank raised an
    InputError, every rank raises the first failing rank's error."""
    if state.num_processes == 1:
        return fn()
    import torch.distributed as dist

    result, lines = None, None
    try:
        result = fn()
    except InputError as err:
        lines = err.lines
    gathered: list[Any] = [None] * state.num_processes
    dist.all_gather_object(gathered, lines)
    failed = [(number, got) for number, got in enumerate(gathered) if got is not None]
    if failed:
        first, got = failed[0]
        if state.process_index == 0 and first != 0:  # rank 0 prints it: say whose it is
            got = [f"rank {first}: {line}" for line in got]
        raise _shared_error(got, from_rank=first, state=state)
    return result


def any_rank(state: Any, flag: Callable[[], bool]) -> Callable[[], bool]:
    """`flag()` true on any process (a signal reached one rank): one all-reduce per call."""
    if state.num_processes == 1:
        return flag

    def agreed() -> bool:
        import torch

        local = torch.tensor([1.0 if flag() else 0.0], device=state.device)
        return bool(state.reduce(local, reduction="sum").item() > 0)

    return agreed


def _broadcast(state: Any, value: Any) -> Any:
    import torch.distributed as dist

    box = [value if state.is_main_process else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _shared_error(lines: list[str], *, from_rank: int, state: Any) -> InputError:
    """The error one rank found, as every rank raises it: rank 0 prints it, the others exit
    quietly."""
    return InputError(*lines, shown_by_main=state.process_index != 0, from_rank=from_rank)


# ---- leaving -------------------------------------------------------------------------------

def found_on_every_rank(message: str) -> InputError:
    """A bad input every rank finds alike: rank 0 prints it, the others exit quietly."""
    return InputError(message, shown_by_main=not is_main())


def wait_for_main_to_report() -> None:
    """On a rank other than 0, after a bad-input error that rank 0 also raised and prints
    (`InputError.shown_by_main`): wait for rank 0 to print it and exit, the launcher then
    ending this process quietly (SIGTERM at its default), so that rank 0's line is shown and
    its exit code is the job's. On a loaded machine rank 0 can take seconds to get there, so
    the wait is long (QUIET_RANK_WAIT_S) and ended by the launcher, not by a guess. Leave the
    process group first (`leave_process_group`)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(QUIET_RANK_WAIT_S)


def exit_process(code: int) -> None:
    """Exit with `code`. A launched process exits at once (os._exit) after flushing its
    output: a normal interpreter exit with the process group's threads alive can abort
    ("terminate called without an active exception", SIGABRT) and lose the exit code."""
    if launched() and "torch" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
