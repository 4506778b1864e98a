"""`peftune train`: train in this process (`train_command`), or, with `--nproc N` /
`--accelerate-config FILE`, re-launch this command with several processes on this machine and
report the launched job's exit code.

Without a config, the processes are started by torch elastic (what `torchrun --standalone`
does): on GPUs each process takes one GPU (NCCL), on CPU they talk over gloo. With
`--accelerate-config`, Accelerate's own launcher reads the file (DDP, FSDP, DeepSpeed,
multi-node), with `--nproc` overriding its `num_processes`. Either way the exit code of the
first process that failed is this command's exit code (2 for bad input), and the launcher's
own failure report is not printed: the failing process already printed its one line.

The launched processes run this command as typed, less the launch flags (`child_argv`).

Importing this module imports neither torch nor accelerate.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from peftune import dist
from peftune.errors import InputError
from peftune.interrupts import signals_raise
from peftune.train.interrupts import RunInterrupted, remember_launch_flags, train_interrupted

# How long the launcher waits for its processes to stop after it forwarded SIGINT/SIGTERM to
# them (torch elastic's default is 30 s, then SIGKILL): they finish the optimizer step and
# write a checkpoint first, which can take minutes for a large model.
SHUTDOWN_TIMEOUT_S = 900

# The flags that start the processes: the launched command is this one without them.
LAUNCH_OPTIONS = ("--nproc", "--accelerate-config")


def train_command(recipe_path: Path, overrides: list[str], *, resume: bool, overwrite: bool,
                  nproc: str | None, accelerate_config: Path | None, argv: list[str]) -> int:
    """`peftune train`: train the recipe in this process, or relaunch this command with
    several processes (`--nproc`, `--accelerate-config`); returns the exit code. `argv`: this
    command's arguments as typed (`sys.argv[1:]`), for the launched processes."""
    from peftune.models import warn_remote_code
    from peftune.models.facts import inspect_model
    from peftune.recipe import load_recipe

    processes, config = parse_nproc(nproc), check_config(accelerate_config)
    # Rank 0 alone judges output.dir: other ranks may start after it has begun to write there.
    recipe = load_recipe(recipe_path, overrides, check_output=dist.is_main(),
                         inspect_model=inspect_model)
    out = Path(recipe.output.dir)
    if config is not None or (processes or 1) > 1:  # re-launch with several processes
        if dist.launched():
            raise InputError("--nproc/--accelerate-config: this process was already started by a "
                             "launcher (torchrun, accelerate launch); drop the flag")
        from peftune.train.output import check_output_dir

        warn_remote_code(recipe.model)
        check_output_dir(out, resume=resume, overwrite=overwrite)
        remember_launch_flags(processes, config)
        return relaunch(child_argv(argv), nproc=processes, config=config)  # rank 0 says why
    if dist.is_main():
        warn_remote_code(recipe.model)
    from peftune.train.run import run_train

    try:
        with signals_raise():
            run_train(recipe, resume=resume, overwrite=overwrite)
    except (RunInterrupted, KeyboardInterrupt) as stop:  # at a step boundary, or outside the loop
        return train_interrupted(stop, recipe=recipe_path, overrides=overrides, out=out,
                                 resume=resume)
    if dist.launched():  # one of several processes: leave without the interpreter's teardown
        dist.exit_process(0)
    return 0


def child_argv(argv: list[str]) -> list[str]:
    """The launched processes' command line: `argv` as typed, in its order, without the launch
    flags (`--nproc N`, `--nproc=N`, `--accelerate-config FILE`, `--accelerate-config=FILE`)."""
    child: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--":  # the rest are arguments, whatever they look like
            child += [arg, *args]
            break
        if arg in LAUNCH_OPTIONS:
            next(args, None)  # and its value
        elif not arg.startswith(tuple(f"{option}=" for option in LAUNCH_OPTIONS)):
            child.append(arg)
    return child


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

    from peftune.compat import torchrun_launch

    # What `torchrun --standalone` does: a local rendezvous on a free port.
    config, cmd, cmd_args = torchrun_launch([
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--rdzv-id", uuid.uuid4().hex,
        "--nnodes", "1", "--nproc-per-node", str(nproc), *module])
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
