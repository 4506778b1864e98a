"""The `peftune` console script re-executes the commands that train with jemalloc preloaded
(peftune.allocator): when, with what, and how a bad PEFTUNE_ALLOCATOR is refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from peftune.allocator import JEMALLOC_CONF, current, reexec_env
from peftune.errors import InputError

LIB = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")


def test_a_training_command_is_re_executed_with_jemalloc():
    env = reexec_env(["peftune", "train", "r.yaml"], {"PATH": "/bin"}, library=LIB)
    assert env["LD_PRELOAD"] == str(LIB) and env["MALLOC_CONF"] == JEMALLOC_CONF
    assert env["PATH"] == "/bin"
    kept = reexec_env(["peftune", "--quiet", "compare", "r.yaml"],
                      {"LD_PRELOAD": "/x/libother.so", "MALLOC_CONF": "narenas:2"}, library=LIB)
    assert kept["LD_PRELOAD"] == f"{LIB}:/x/libother.so" and kept["MALLOC_CONF"] == "narenas:2"


@pytest.mark.parametrize("argv, environ, library", [
    (["peftune", "validate", "r.yaml"], {}, LIB),  # a light command: no re-exec
    (["peftune", "--help"], {}, LIB),
    (["peftune", "train", "r.yaml"], {"LD_PRELOAD": str(LIB)}, LIB),  # already preloaded
    (["peftune", "train", "r.yaml"], {"PEFTUNE_ALLOCATOR": "system"}, LIB),
    (["peftune", "train", "r.yaml"], {}, None),  # no library: glibc, silently
])
def test_no_re_exec_where_it_brings_nothing(argv, environ, library):
    assert reexec_env(argv, environ, library=library) is None


def test_a_bad_or_unmet_allocator_choice_is_one_line():
    with pytest.raises(InputError, match="PEFTUNE_ALLOCATOR=tcmalloc: use one of auto, "
                                         "jemalloc, system"):
        reexec_env(["peftune", "train"], {"PEFTUNE_ALLOCATOR": "tcmalloc"}, library=LIB)
    with pytest.raises(InputError, match="PEFTUNE_ALLOCATOR=jemalloc: no libjemalloc found"):
        reexec_env(["peftune", "train"], {"PEFTUNE_ALLOCATOR": "jemalloc"}, library=None)


def test_the_console_script_execs_python_m_peftune_cli_with_the_preload(monkeypatch, capsys):
    import peftune.allocator as allocator
    from peftune import cli

    calls = []
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: LIB)
    monkeypatch.setattr(allocator.os, "execve", lambda *args: calls.append(args) or sys.exit(0))
    monkeypatch.setattr(sys, "argv", ["peftune", "train", "r.yaml", "train.lr=1e-3"])
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("PEFTUNE_ALLOCATOR", raising=False)
    with pytest.raises(SystemExit):
        cli.entry()
    (executable, args, env), = calls
    assert executable == sys.executable
    assert args == [sys.executable, "-m", "peftune.cli", "train", "r.yaml", "train.lr=1e-3"]
    assert env["LD_PRELOAD"].startswith(str(LIB))
    # the re-executed process says so in the run's header and summary
    monkeypatch.setenv("LD_PRELOAD", str(LIB))
    assert current() == "jemalloc"
    monkeypatch.setattr(sys, "argv", ["peftune", "train", "r.yaml"])
    monkeypatch.setenv("PEFTUNE_ALLOCATOR", "nope")
    with pytest.raises(SystemExit) as stop:
        cli.entry()
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("error: PEFTUNE_ALLOCATOR=nope: use one of auto, "
                                       "jemalloc, system\n")
