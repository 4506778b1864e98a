"""What the benchmark scripts share: running a child process and measuring it (wall time,
peak RSS), package versions, and verdicts of figures against their targets.

The scripts run as `python3 scripts/bench_X.py`, which puts scripts/ on sys.path, so each
does `import benchlib`. Importing this module costs the standard library only (psutil is
imported by the functions that sample RSS), so a measured child may import it too.

Three ways to a peak RSS, each named for what it reads:

  peak_rss_bytes()  this process's ru_maxrss, the figure peftune's summary.json reports;
  run_python()      a fresh Python child's VmHWM, read by the child as its last act;
  run_child(sample_rss=True)  the largest RSS summed over a child's process tree, sampled.
"""

from __future__ import annotations

import operator
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

MiB = 1 << 20
SAMPLE_SECONDS = 0.1  # one sample of a process tree costs ~2 ms of CPU
LOG_TAIL_LINES = 30

# --------------------------------------------------------------------------- peak RSS


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes: getrusage(RUSAGE_SELF).ru_maxrss
    (KiB on Linux, bytes on macOS), the same figure peftune's own summary.json reports.

    Linux carries the high-water mark over fork and exec: a process started by a larger one
    reads at least its parent's RSS at the start. Where a child may stay smaller than the
    process that started it, measure it with `run_python` (VmHWM) instead."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def current_rss_bytes() -> int:
    """This process's resident set size now, in bytes (psutil)."""
    import psutil

    return psutil.Process().memory_info().rss


def tree_rss_bytes(process) -> int:
    """The RSS of a psutil process and all its descendants now, summed (a page shared by two
    of them counts once for each); a member that exits meanwhile counts nothing."""
    import psutil

    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


# --------------------------------------------------------------------------- child processes


def load_average() -> float:
    """The 1-minute load average (nan where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


@dataclass(frozen=True)
class ChildRun:
    """One finished child: its wall time, the peak of its process tree's summed RSS (None
    unless sampled) and the 1-minute load average when it ended."""

    wall_seconds: float
    peak_rss_bytes: int | None
    load_after: float


def _wall_and_load(run: ChildRun) -> str:
    return f" {run.wall_seconds:.1f}s wall (1-min load average after: {run.load_after:.2f})"


def run_child(name: str, command: list[str], *, log: Path, env: dict | None = None,
              sample_rss: bool = False, quiet: bool = False, width: int = 22,
              waiting: str = "running ...",
              describe: Callable[[ChildRun], str] = _wall_and_load) -> ChildRun:
    """Run `command` to completion, its stdout and stderr into `log`, and time it.

    Prints `  NAME WAITING` as it starts and `describe(run)` on the same line when it ends
    (not with `quiet`). With `sample_rss`, peak RSS is the largest `tree_rss_bytes` of the
    child sampled every SAMPLE_SECONDS: a spike shorter than that can be missed. Raises
    RuntimeError naming the exit code, with the log's last lines, when the child fails."""
    if not quiet:
        print(f"  {name:<{width}} {waiting}", end="", flush=True)
    began = time.perf_counter()
    peak = None
    with log.open("w") as handle:
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        if sample_rss:
            import psutil

            process, peak = psutil.Process(child.pid), 0
            while child.poll() is None:
                try:
                    peak = max(peak, tree_rss_bytes(process))
                except psutil.Error:  # the child itself just exited
                    pass
                time.sleep(SAMPLE_SECONDS)
        code = child.wait()
    run = ChildRun(time.perf_counter() - began, peak, load_average())
    if not quiet:
        print(describe(run), flush=True)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        raise RuntimeError(f"{name} failed with exit code {code}; last lines of {log}:\n{tail}")
    return run


_VMHWM_MARK = "benchlib-VmHWM-kB"
_PRINT_VMHWM = (f"\nprint({_VMHWM_MARK!r}, [line.split()[1] for line in open('/proc/self/status')"
                " if line.startswith('VmHWM')][0], flush=True)\n")


def run_python(code: str, *args: str, log: Path, name: str = "python -c") -> dict:
    """{"peak_rss_bytes", "wall_seconds"} of a fresh `python -c CODE ARGS...` (Linux).

    Peak RSS is the child's VmHWM (/proc/self/status), printed by the child once `code` has
    run: the high-water mark of its own address space, which, unlike ru_maxrss, starts afresh
    at exec, so the size of the process that started it does not show. Output goes to
    `log`; a failure raises RuntimeError naming it `name`, as `run_child` does."""
    run = run_child(name, [sys.executable, "-c", code + _PRINT_VMHWM, *args], log=log,
                    quiet=True)
    marks = [line.split()[1] for line in log.read_text(errors="replace").splitlines()
             if line.startswith(_VMHWM_MARK)]
    return {"peak_rss_bytes": int(marks[-1]) * 1024, "wall_seconds": run.wall_seconds}


def interleaved(runs: dict[str, tuple[Callable[[str], dict], Callable[[dict], float]]],
                repeats: int) -> dict[str, dict]:
    """Run each of `runs` (name: (run given a tag for its line, its seconds)) `repeats`
    times, interleaved, and keep each one's fastest run: on a shared machine, noise only
    ever slows a run down. Every other round runs them in reverse order (A B, B A, ...), so
    that a change in the machine's load during the rounds favours none of them. Every run's
    seconds are kept beside it (`repeat_seconds`); peak RSS is the highest of all runs."""
    attempts: dict[str, list[dict]] = {name: [] for name in runs}
    for round_ in range(1, repeats + 1):
        tag = f" [{round_}/{repeats}]" if repeats > 1 else ""
        order = list(runs.items())
        for name, (run, _) in (order if round_ % 2 else order[::-1]):
            attempts[name].append(run(tag))
    best = {}
    for name, (_, seconds) in runs.items():
        chosen = min(attempts[name], key=seconds)
        best[name] = {**chosen, "repeat_seconds": [seconds(a) for a in attempts[name]]}
        if "peak_rss_bytes" in chosen:  # memory is not noise: the highest sample counts
            best[name]["peak_rss_bytes"] = max(a["peak_rss_bytes"] for a in attempts[name])
    return best


def busy_note(loads: list[float], *, limit: float, noun: str = "figures") -> str | None:
    """A note when the 1-minute load average after some run went above `limit` (the cores
    the benchmark uses, plus a half): other work shared the machine."""
    if not loads or max(loads) <= limit:
        return None
    return (f"the machine was busy (1-min load average up to {max(loads):.1f} on "
            f"{os.cpu_count()} CPUs): {noun} are noisier than usual")


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """`sys.exit(main())`, with a RuntimeError shown as one `error:` line (exit status 1)."""
    try:
        sys.exit(main())
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


# --------------------------------------------------------------------------- versions


def package_version(distribution: str) -> str | None:
    """The installed version of a distribution (`zip-fit`, `torch`), None if absent."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def importable(module: str) -> bool:
    """Whether `import module` would find it (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_modules(modules: Iterable[str]) -> list[str]:
    """Those of `modules` that are not importable, in order."""
    return [module for module in modules if not importable(module)]


# --------------------------------------------------------------------------- verdicts

COMPARISONS = {">=": operator.ge, "<=": operator.le, "<": operator.lt, ">": operator.gt}


def meets(value: float, comparison: str, target: float) -> bool:
    """Whether `value COMPARISON target` holds (comparison one of >=, <=, <, >)."""
    return bool(COMPARISONS[comparison](value, target))


def verdict(what: str, value: float | None, comparison: str, target: float | None) -> dict:
    """The record of one figure against its target: {"what", "value", "target",
    "comparison", "pass"}; "pass" is None where the value or the target is unknown (not
    measured)."""
    if value is None or target is None:
        return {"what": what, "value": value, "target": target, "comparison": comparison,
                "pass": None}
    value = float(value)
    return {"what": what, "value": value, "target": target, "comparison": comparison,
            "pass": meets(value, comparison, target)}


def verdict_word(passed: bool | None, *, missed: str = "FAIL") -> str:
    """PASS, `missed` (FAIL, or MISS where missing a target is no error), or 'not measured'."""
    if passed is None:
        return "not measured"
    return "PASS" if passed else missed


def verdict_line(item: dict, *, width: int, value: str, target: str, missed: str = "FAIL") -> str:
    """One printed verdict: `WHAT  VALUE   target TARGET  PASS|MISS|FAIL`, or
    `WHAT  VALUE   not measured`; `value` and `target` come formatted to their widths."""
    if item["pass"] is None:
        return f"{item['what']:<{width}} {value}   not measured"
    word = verdict_word(item["pass"], missed=missed)
    return f"{item['what']:<{width}} {value}   target {target} {word}"
