"""`peftune train --nproc N` / `--accelerate-config FILE`: re-launch this command with several
processes on this machine, and report the launched job's exit code.

Without a config, the processes are started by torch elastic (what `torchrun --standalone`
does): on GPUs each process takes one GPU (NCCL), on CPU they talk over gloo. With
`--accelerate-config`, Accelerate's own launcher reads the file (DDP, FSDP, DeepSpeed,
multi-node), with `--nproc` overriding its `num_processes`. Either way the exit code of the
first process that failed is this command's exit code (2 for bad input), and the launcher's
own failure report is not printed: the failing process already printed its one line.

Importing this module imports neither torch nor accelerate.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from peftune.errors import InputError

# How long the launcher waits for its processes to stop after it forwarded SIGINT/SIGTERM to
# them (torch elastic's default is 30 s, then SIGKILL): they finish the optimizer step and
# write a checkpoint first, which can take minutes for a large model.
SHUTDOWN_TIMEOUT_S = 900

# How long a rank other than 0 waits, after a bad-input error that rank 0 prints, for the
# launcher to end it once rank 0 has exited with the error (seconds; it exits itself after).
QUIET_RANK_WAIT_S = 60.0


def parse_nproc(value: str | None) -> int | None:
    """`--nproc`: a whole number >= 1, or None when not given."""
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise InputError(f"--nproc: expected a whole number of processes >= 1, got {value!r}")
    return n


def check_config(path: Path | None) -> Path | None:
    if path is None:
        return None
    if not path.is_file():
        raise InputError(f"--accelerate-config: {path} is not a file; pass an accelerate "
                         "config YAML (see configs/ and docs/distributed.md)")
    return path


def launched() -> bool:
    """True inside a process started by a launcher (torchrun, accelerate launch)."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def command_argv(ctx: Any, *, drop: set[str]) -> list[str]:
    """The arguments that re-create this Click/Typer command call, without the `drop`
    parameters (the launch flags), in the command's own order."""
    argv = [ctx.info_name]
    for param in ctx.command.params:
        if param.name in drop:
            continue
        value = ctx.params.get(param.name)
        if param.param_type_name == "argument":
            argv += [str(v) for v in value] if isinstance(value, list | tuple) else (
                [] if value is None else [str(value)])
        elif param.is_flag:
            if value and not param.secondary_opts:
                argv.append(param.opts[0])
        elif value is not None and value != param.default:
            for one in value if isinstance(value, list | tuple) else [value]:
                argv += [param.opts[0], str(one)]
    return argv


def relaunch(argv: list[str], *, nproc: int | None, config: Path | None) -> int:
    """Run `python -m peftune.cli ARGV` under a launcher; returns the job's exit code."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and the launcher does not warn about it
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    if os.environ.get("PEFTUNE_DEBUG") != "1":
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    module = ["-m", "peftune.cli", *argv]
    if config is not None:
        return _accelerate_launch(config, nproc, module)
    return _elastic_launch(nproc or 1, module)


def _elastic_launch(nproc: int, module: list[str]) -> int:
    import uuid

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    # What `torchrun --standalone` does: a local rendezvous on a free port.
    args = get_args_parser().parse_args([
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--rdzv-id", uuid.uuid4().hex,
        "--nnodes", "1", "--nproc-per-node", str(nproc), *module])
    config, cmd, cmd_args = config_from_args(args)
    _quiet_elastic_logs()
    try:
        elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
    except ChildFailedError as failed:
        return _exit_code(failed)
    except SignalException as stopped:  # the processes got it too and have stopped
        return 128 + int(stopped.sigval)
    return 0


def _accelerate_launch(config: Path, nproc: int | None, module: list[str]) -> int:
    import subprocess

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    flags = ["--config_file", str(config)]
    if nproc is not None:
        flags += ["--num_processes", str(nproc)]
    args = launch_command_parser().parse_args([*flags, *module])
    _quiet_elastic_logs()
    try:
        launch_command(args)
    except ChildFailedError as failed:
        return _exit_code(failed)
    except SignalException as stopped:
        return 128 + int(stopped.sigval)
    except subprocess.CalledProcessError as failed:  # a one-process config
        return failed.returncode
    except SystemExit as stopped:
        return stopped.code if isinstance(stopped.code, int) else 1
    return 0


def _quiet_elastic_logs() -> None:
    """torch elastic's loggers each get their own level (WARNING) when created: without
    PEFTUNE_DEBUG=1 they say nothing ("Received 15 death signal, shutting down workers"),
    the processes say what happened."""
    if os.environ.get("PEFTUNE_DEBUG") == "1":
        return
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _exit_code(failed: Any) -> int:
    """The first failed process's exit code; a process killed by a signal gives 128 + it."""
    rank, failure = failed.get_first_failure()
    code = failure.exitcode
    if code < 0:
        import signal

        name = signal.Signals(-code).name if -code in signal.valid_signals() else -code
        print(f"error: process rank {rank} was killed by {name}", file=sys.stderr)
        return 128 - code
    return code


def found_on_every_rank(message: str) -> InputError:
    """A bad input every rank finds alike: rank 0 prints it, the others exit quietly
    (`quiet_on_this_rank`)."""
    err = InputError(message)
    err.shown_by_main = os.environ.get("RANK", "0") != "0"
    return err


def quiet_on_this_rank(err: BaseException) -> bool:
    """A bad-input error that rank 0 also raised and prints: the other ranks wait for rank 0
    to print it and exit (the launcher then ends them), so that rank 0's line is shown and its
    exit code is the job's; on a loaded machine rank 0 can take seconds to get there, so the
    wait is long and ended by the launcher, not by a guess. Either way the process group is
    left first: exiting with it live can abort the process (SIGABRT)."""
    leave_process_group()
    if getattr(err, "shown_by_main", False):
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # ended by the launcher: quietly
        time.sleep(QUIET_RANK_WAIT_S)
        return True
    return False


def exit_process(code: int) -> None:
    """Exit with `code`. A launched process exits at once (os._exit) after flushing its
    output: a normal interpreter exit with the process group's threads alive can abort
    ("terminate called without an active exception", SIGABRT) and lose the exit code."""
    if launched() and "torch" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def leave_process_group() -> None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available():
        return
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank_prefix() -> str:
    """'rank N: ' on a process other than rank 0 of a multi-process run, else ''; the process
    group is left (the caller is about to exit on an error)."""
    leave_process_group()
    rank = os.environ.get("RANK", "0")
    return f"rank {rank}: " if launched() and rank != "0" else ""
