"""scripts/build_demo_corpus.py: the demo's data, built from the running Python's own files."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest
from conftest import load_script, read_jsonl

FILES = ("pretrain.jsonl", "tests_train.jsonl", "tests_val.jsonl", "instruct_train.jsonl")
SMALL = ["--max-docs", "300", "--max-test-docs", "120", "--max-val-docs", "30"]


builder = load_script("build_demo_corpus")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "seed0"
    assert builder.main(["--out", str(out), "--seed", "0", *SMALL]) == 0
    return out


def test_writes_every_file_with_text_rows(corpus: Path, capsys):
    assert sorted(p.name for p in corpus.iterdir()) == sorted(FILES)  # no temp files left
    caps = {"pretrain.jsonl": 300, "tests_train.jsonl": 120, "tests_val.jsonl": 30}
    for name, cap in caps.items():
        rows = read_jsonl(corpus / name)
        assert 0 < len(rows) <= cap, name
        for row in rows:
            assert isinstance(row["text"], str)
            assert builder.MIN_CHARS <= len(row["text"]) <= builder.MAX_CHARS, (name, row["source"])
    # every CPython has enough library code
    assert len(read_jsonl(corpus / "pretrain.jsonl")) == 300


def test_pretrain_mixes_prose_and_library_code(corpus: Path):
    sources = [row["source"] for row in read_jsonl(corpus / "pretrain.jsonl")]
    prose = [s for s in sources if s.startswith("pydoc:")]
    code = [s for s in sources if s.endswith(".py")]
    assert prose and code and len(prose) + len(code) == len(sources)
    assert len(set(code)) > 50  # many modules, not a few large ones
    # Test code is the fine-tuning domain: pre-training never sees it.
    assert not any(Path(s).name.startswith("test") or "/test/" in f"/{s}" for s in code)


def test_val_and_train_come_from_different_files(corpus: Path):
    train = {row["source"] for row in read_jsonl(corpus / "tests_train.jsonl")}
    val = {row["source"] for row in read_jsonl(corpus / "tests_val.jsonl")}
    assert train and val and not train & val


def test_instruction_rows(corpus: Path):
    rows = read_jsonl(corpus / "instruct_train.jsonl")
    assert len(rows) > 50
    assert len({row["prompt"] for row in rows}) == len(rows)
    for row in rows:
        assert row["prompt"].startswith("Explain the Python topic: ")
        assert len(row["prompt"]) > len("Explain the Python topic: ")
        assert row["response"].strip()


def test_same_seed_same_bytes_other_seed_other_sample(corpus: Path, tmp_path: Path):
    again, other = tmp_path / "again", tmp_path / "other"
    assert builder.main(["--out", str(again), "--seed", "0", *SMALL]) == 0
    assert builder.main(["--out", str(other), "--seed", "1", *SMALL]) == 0
    for name in FILES:
        assert (again / name).read_bytes() == (corpus / name).read_bytes(), name
    assert (other / "pretrain.jsonl").read_bytes() != (corpus / "pretrain.jsonl").read_bytes()


def test_chunk_tests_keeps_test_functions_only():
    checks = "".join(f"        self.assertEqual(nested() + {i}, {i + 2})\n" for i in range(8))
    source = textwrap.dedent("""
        import unittest

        def helper():
            return 1

        class T(unittest.TestCase):
            def setUp(self):
                self.x = 1

            @unittest.skipIf(False, "never")
            def test_one(self):
                def nested():
                    return 2
        """) + checks + textwrap.dedent("""
            def test_two(self):
                self.assertTrue(self.x)
        """).replace("\n", "\n    ")
    chunks = builder.chunk_tests(source)
    assert len(chunks) == 1  # short neighbours share a chunk
    chunk = chunks[0]
    assert chunk.startswith("@unittest.skipIf")  # decorators stay with their function
    assert "def nested" in chunk and "def test_two(self):\n    self.assertTrue" in chunk
    assert "setUp" not in chunk and "helper" not in chunk


def test_pack_keeps_sizes_within_bounds():
    pieces = ["x" * 50 + "\n"] * 40 + ["y" * 4000 + "\n"] + ["z\n\n" * 900]
    chunks = builder.pack(pieces)
    assert chunks and all(builder.MIN_CHARS <= len(c) <= builder.MAX_CHARS for c in chunks)


def test_stripped_test_directory_falls_back_to_held_out_library_code(tmp_path: Path):
    # A distribution without Lib/test (Debian's python3 without its -testsuite package).
    stdlib = tmp_path / "lib"
    (stdlib / "test").mkdir(parents=True)
    (stdlib / "test" / "__init__.py").write_text("")
    for i in range(12):
        (stdlib / f"module{i}.py").write_text(f"def f{i}():\n    return {i}\n")
    library = builder.library_files(stdlib)
    assert len(library) == 12
    files, chunker, note = builder.finetune_domain(stdlib, library, random.Random(0))
    assert chunker is builder.chunk_code and "kept out of pretrain" in note
    assert len(files) == 3 and len(library) == 9 and not set(files) & set(library)
