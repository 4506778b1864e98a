"""The bad-input corpus (tests/bad_inputs/cases.yaml): malformed recipes, data files and
command lines, each run through the real CLI entry point. Every case must exit with code 2,
print exactly one line on stderr naming what to fix (file:line, key, flag or path), show no
traceback, and leave the scratch directory exactly as it was (no output directory, no
half-written file). Most cases call `peftune.cli.main` in-process (a fresh interpreter
costs seconds); the ones marked `subprocess: true` run `python -m peftune.cli`."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, main_in_process, make_text_rows, run_cli, write_jsonl

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())["cases"]
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path below `root` (the data cache aside) with its size and mtime."""
    out = {}
    for path in root.rglob("*"):
        if path.relative_to(root).parts[0] == "cache":
            continue
        stat = path.lstat()
        out[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return out


def copy_corpus(dest: Path, model: Path) -> None:
    """The corpus files into `dest`, recipes with @MODEL@ filled in, plus a good good.jsonl."""
    for source in CORPUS.iterdir():
        if source.name == "cases.yaml":
            continue
        target = dest / source.name
        if source.is_dir():
            shutil.copytree(source, target)
            continue
        raw = source.read_bytes()
        target.write_bytes(raw.replace(b"@MODEL@", str(model).encode()))
    write_jsonl(dest / "good.jsonl", make_text_rows(16))


def _setup(dest: Path, setup: dict) -> None:
    for kind, name in (setup or {}).items():
        if kind == "symlink_loop":
            (dest / name).unlink(missing_ok=True)
            (dest / name).symlink_to(name)
        elif kind == "git_root":
            (dest / name / ".git").mkdir(parents=True)
            (dest / name / "README").write_text("a repository, not a run\n")
        elif kind == "unreadable":
            if AS_ROOT:
                pytest.skip("running as root: a chmod 000 file stays readable")
            (dest / name).chmod(0)
        else:
            raise AssertionError(f"cases.yaml: unknown setup {kind}")


def _peftune(argv: list[str], *, in_process: bool, capsys) -> tuple[int, str]:
    """(exit code, stderr) of `peftune ARGV` in the current directory."""
    if not in_process:
        done = run_cli(*argv, env={"PYTHONPATH": str(REPO), "COLUMNS": "200",
                                   "PEFTUNE_DEBUG": None})
        return done.returncode, done.stderr
    code, _, stderr = main_in_process(capsys, *argv)
    return code, stderr


def test_the_corpus_is_big_and_every_file_is_used():
    assert len(CASES) >= 30
    assert len({case["id"] for case in CASES}) == len(CASES)
    named = " ".join(case["argv"] for case in CASES)
    recipes = [p for p in CORPUS.glob("*.yaml") if p.name != "cases.yaml"]
    unused = [p.name for p in recipes if p.name not in named and p.name != "good.yaml"]
    assert not unused, f"recipes no case runs: {unused}"


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_input_exits_2_with_one_line(case, tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.delenv("PEFTUNE_DEBUG", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("PEFTUNE_CACHE", str(work / "cache"))
    copy_corpus(work, tiny_model_dir)
    _setup(work, case.get("setup"))
    monkeypatch.chdir(work)
    before = _snapshot(work)
    code, stderr = _peftune(shlex.split(case["argv"]), in_process=not case.get("subprocess"),
                            capsys=capsys)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert code == 2, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and case["expect"] in lines[0], lines[0]
    assert _snapshot(work) == before, "the command created or changed files"


@pytest.mark.parametrize("argv, blocked, expect", [
    (["train", "data_unreadable.yaml"], "locked.jsonl",
     "error: data.train: cannot read locked.jsonl (Permission denied); check the file's permissions"),
    (["train", "good.yaml"], "good.yaml",
     "error: good.yaml: cannot read the recipe (permission denied); check the file's permissions"),
])
def test_unreadable_files_even_as_root(argv, blocked, expect, tmp_path, tiny_model_dir,
                                       monkeypatch, capsys):
    """The unreadable cases above skip as root (chmod 000 does not stop root): here the
    file's open fails with EACCES as it would for a user, and the same one line comes out."""
    import errno
    import pathlib

    copy_corpus(tmp_path, tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    real_open = pathlib.Path.open

    def denied(self, *args, **kwargs):
        if self.name == blocked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", denied)
    before = _snapshot(tmp_path)
    code, stderr = _peftune(argv, in_process=True, capsys=capsys)
    assert (code, stderr.splitlines()) == (2, [expect])
    assert _snapshot(tmp_path) == before
