"""jemalloc for the processes that train: the `peftune` command re-executes itself once with
jemalloc preloaded, where the library is installed (Debian/Ubuntu: `libjemalloc2`; `make
install` installs it where it can).

Why: a CPU training step allocates and frees gigabytes of activations, and glibc's heap
keeps the freed chunks resident, fragmented by small long-lived allocations carved out of
them. Measured on the real model (SmolLM2-135M, LoRA r 16, 4 x 512 tokens, checkpointed;
scripts/bench_qlora_memory.py, docs/memory.md): peak RSS 3.21 GiB with glibc against 1.53
GiB with jemalloc for the fp32 base, and 3.37 against 1.19 GiB for nf4, at the same or a
higher speed. jemalloc is set never to return freed pages to the system
(`dirty_decay_ms:-1,muzzy_decay_ms:-1`): returning them costs a page fault per page on
reuse (0.55 s per GB on this VM), which made steps ~25% slower; kept, they are reused
without fragmenting, so the peak stays at the working set.

`PEFTUNE_ALLOCATOR=system` keeps glibc; `PEFTUNE_ALLOCATOR=jemalloc` makes a missing library
an error rather than a silent fallback. Only the console script re-executes (tests call
`peftune.cli.main` in their own process), before anything heavy is imported; every process
it starts (`--nproc`, compare's runs) inherits the preload.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from peftune.errors import InputError

ENV = "PEFTUNE_ALLOCATOR"
CHOICES = ("auto", "jemalloc", "system")
# The commands whose processes allocate tensors at scale (not --help, validate, methods).
HEAVY_VERBS = frozenset({"train", "compare", "sweep", "eval", "merge", "export", "compensate",
                         "chat", "select-data"})
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
SEARCH = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
          "/usr/local/lib", "/opt/homebrew/lib")
NAMES = ("libjemalloc.so.2", "libjemalloc.so")


def find_jemalloc(search: tuple[str, ...] = SEARCH) -> Path | None:
    for folder in search:
        for name in NAMES:
            path = Path(folder) / name
            if path.is_file():
                return path
    return None


def preloaded(environ: Mapping[str, str]) -> str | None:
    """The allocator this process runs with, as far as the environment says."""
    if any("jemalloc" in part for part in environ.get("LD_PRELOAD", "").split(":")):
        return "jemalloc"
    return None


def reexec_env(argv: list[str], environ: Mapping[str, str], *,
               library: Path | None) -> dict[str, str] | None:
    """The environment to re-execute `argv` with jemalloc preloaded; None: run as is (a
    light command, jemalloc already loaded, `PEFTUNE_ALLOCATOR=system`, or no library)."""
    choice = environ.get(ENV, "auto") or "auto"
    if choice not in CHOICES:
        raise InputError(f"{ENV}={choice}: use one of {', '.join(CHOICES)}")
    verb = next((arg for arg in argv[1:] if not arg.startswith("-")), None)
    if choice == "system" or verb not in HEAVY_VERBS or preloaded(environ):
        return None
    if library is None:
        if choice == "jemalloc":
            raise InputError(f"{ENV}=jemalloc: no libjemalloc found in {', '.join(SEARCH)}; "
                             "install it (apt-get install libjemalloc2) or unset "
                             f"{ENV}")
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = ":".join(p for p in (str(library), environ.get("LD_PRELOAD", "")) if p)
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def maybe_reexec() -> None:
    """Replace this process by itself with jemalloc preloaded, where `reexec_env` says so."""
    env = reexec_env(sys.argv, os.environ, library=find_jemalloc())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "peftune.cli", *sys.argv[1:]], env)


def current() -> str:
    """The allocator of this process (for the run's header and summary)."""
    return preloaded(os.environ) or "system"
