"""scripts/build_demo_task.py: the demo's questions, built from the running Python's stdlib."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest
from conftest import load_script, read_jsonl

builder = load_script("build_demo_task")


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("task") / "seed0"
    assert builder.main(["--out", str(out), "--seed", "0"]) == 0
    return out


def test_writes_chat_rows_whose_answer_is_the_module(task: Path):
    assert sorted(p.name for p in task.iterdir()) == ["heldout.jsonl", "train.jsonl"]
    train, heldout = read_jsonl(task / "train.jsonl"), read_jsonl(task / "heldout.jsonl")
    assert len(train) == 240 and len(heldout) == 40  # every CPython has enough functions
    for row in train + heldout:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == row["module"]
        assert f"`{row['function']}(" in user["content"]
        assert "module name only" in user["content"]  # the format is asked for, plainly
        # The question never gives the answer away.
        assert not builder.gives_away(user["content"].split("documented as", 1)[1], row["module"])


def test_heldout_functions_are_never_trained_on(task: Path):
    train, heldout = read_jsonl(task / "train.jsonl"), read_jsonl(task / "heldout.jsonl")
    trained = {row["function"] for row in train}
    assert not trained & {row["function"] for row in heldout}
    assert len({row["module"] for row in heldout}) >= 20  # many modules, not a few large ones
    # Held-out functions belong to modules the training questions cover (other functions).
    covered = {row["module"] for row in train}
    assert sum(row["module"] in covered for row in heldout) >= 0.9 * len(heldout)


def test_same_seed_same_bytes_other_seed_other_split(task: Path, tmp_path: Path):
    again, other = tmp_path / "again", tmp_path / "other"
    assert builder.main(["--out", str(again), "--seed", "0"]) == 0
    assert builder.main(["--out", str(other), "--seed", "1"]) == 0
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (again / name).read_bytes() == (task / name).read_bytes(), name
    assert (other / "heldout.jsonl").read_bytes() != (task / "heldout.jsonl").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--train", "0"], "--train must be at least 1, got 0"),
    (["--heldout", "-3"], "--heldout must be at least 1, got -3"),
])
def test_bad_counts_are_one_line_and_exit_2(args, message, tmp_path: Path, capsys):
    assert builder.main(["--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["taken", "taken/sub"])
def test_out_that_is_or_lies_under_a_file_is_one_line_and_exit_2(out, tmp_path: Path, capsys):
    (tmp_path / "taken").write_text("x")
    assert builder.main(["--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --out") and "not a directory" in err


def test_functions_have_one_answer_and_the_name_users_import(tmp_path: Path):
    stdlib = tmp_path / "lib"
    files = {
        "heapq.py": '''
            def nsmallest(n, iterable, key=None):
                """Find the n smallest elements in a dataset.

                Equivalent to: sorted(iterable, key=key)[:n]
                """
            def merge(*iterables, key=None, reverse=False):
                """Combine several sorted inputs into a single sorted output."""
            def _private(x):
                """A private helper the questions never ask about."""
            def undocumented(x):
                pass
            ''',
        "bisect.py": '''
            def merge(a, b):
                """Defined in two modules: no single right answer."""
            def insort(a, x, *, lo=0, **kw):
                """Insert item x in list a, and keep it sorted."""
            def bisect_left(a, x):
                """Locate the insertion point for x in a to maintain sorted order: bisect."""
            ''',
        "posixpath.py": '''
            def ismount(path):
                """Test whether a path is a mount point."""
            ''',
        "ntpath.py": '''
            def splitdrive(p):
                """Split a pathname into drive and path (Windows twin: skipped)."""
            ''',
        "_pyio.py": '''
            def open_code(path):
                """Opens the provided file with the intent to import the contents."""
            ''',
        "aio/__init__.py": "from .tasks import *\n",
        "aio/tasks.py": '''
            async def sleep(delay, result=None):
                """Coroutine that completes after a given time (in seconds)."""
            ''',
        "test/test_heapq.py": '''
            def test_merge_is_stable(self):
                """Tests are never asked about."""
            ''',
    }
    for name, text in files.items():
        path = stdlib / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    found = {(f.module, f.name): f for f in builder.stdlib_functions(stdlib)}
    assert sorted(found) == [("aio", "sleep"), ("bisect", "insort"), ("heapq", "nsmallest"),
                             ("os.path", "ismount")]
    assert found[("bisect", "insort")].signature == "insort(a, x, *, lo, **kw)"
    assert found[("heapq", "nsmallest")].summary == "Find the n smallest elements in a dataset."


def test_split_keeps_functions_apart_and_every_module_in_training():
    functions = [builder.Function(module=f"m{m}", name=f"f{m}_{i}", signature=f"f{m}_{i}()",
                                  summary="Do something useful with the argument.")
                 for m in range(10) for i in range(6)]
    train, heldout = builder.split_by_function(functions, random.Random(0), n_train=50,
                                               n_heldout=8)
    assert len(heldout) == 8 and len(train) == 50 and not set(train) & set(heldout)
    assert {f.module for f in train} == {f"m{m}" for m in range(10)}  # round-robin
    for module in {h.module for h in heldout}:  # what there is to learn each asked module from
        siblings = 6 - sum(h.module == module for h in heldout)
        assert sum(f.module == module for f in train) >= min(builder.TRAIN_PER_HELDOUT_MODULE,
                                                             siblings)
    assert max(sum(f.module == h.module for f in heldout) for h in heldout) <= 2
