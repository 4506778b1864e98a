"""Data selection: DSIR and ZIP-FIT against their definitions, streaming output, parallel
equivalence, and the CLI's handling of bad input."""

from __future__ import annotations

import gzip
import json
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import TORCHRUN_2, read_jsonl, run_cli

from peftune.select import SelectConfig, kl_reduction, run_select
from peftune.select.dsir import choose, gumbel_noise, split_k, top_k
from peftune.select.ngrams import NgramHasher, sha256_bucket, word_punct
from peftune.select.pool import CHUNK_ROWS
from peftune.select.zipfit import ZipFitScorer, compressed_size, compressor_available, ncd


def _prose_and_code(seed: int = 0) -> tuple[list[str], list[str]]:
    """Real text that ships with Python: pydoc's English topics and stdlib source blocks."""
    import sysconfig
    from pydoc_data.topics import topics

    # Prose: paragraphs with no indented (code sample) line; code: blocks with no comment or
    # docstring, so that the two domains do not share their text.
    prose = [p.strip() for text in topics.values() for p in text.split("\n\n")
             if len(p.split()) >= 8 and "::" not in p
             and not any(line.startswith(" ") for line in p.strip().splitlines())]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = []
    for name in ("argparse.py", "csv.py", "json/decoder.py", "textwrap.py", "string.py",
                 "shutil.py", "tempfile.py", "fractions.py", "tarfile.py", "zipfile.py",
                 "email/_header_value_parser.py", "configparser.py"):
        code += [b.strip() for b in (stdlib / name).read_text().split("\n\n")
                 if len(b.split()) >= 8 and "#" not in b and '"""' not in b]
    rng = random.Random(seed)
    rng.shuffle(prose)
    rng.shuffle(code)
    return prose, code


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> dict[str, Path]:
    """A pool of 950 rows, 250 of them prose (label docs), and 600 held-out prose targets
    (DSIR's target model needs a sample of some size: with 60 targets, most n-grams of a
    new prose paragraph are unseen and weigh log(1e-8))."""
    root = tmp_path_factory.mktemp("mixture")
    prose, code = _prose_and_code()
    rows = [{"text": t, "label": "docs"} for t in prose[:250]]
    rows += [{"text": t, "label": "code"} for t in code[:700]]
    random.Random(1).shuffle(rows)
    pool = root / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    target = root / "target.jsonl"
    target.write_text("".join(json.dumps({"text": t}) + "\n" for t in prose[250:850]))
    # 2,850 rows: three chunks of rows, so that workers and ranks really split the pool.
    big = root / "big.jsonl"
    big.write_bytes(pool.read_bytes() * 3)
    return {"pool": pool, "target": target, "rows": rows, "big": big}


def _select(mixture, out: Path, **keys) -> dict:
    values = {"method": "dsir", "pool": [str(mixture["pool"])],
              "target": [str(mixture["target"])], "k": 150, "label_field": "label", **keys}
    return run_select(SelectConfig(**values), out=out, quiet=True)


def _precision(report: dict) -> float:
    return report["labels"]["selected"].get("docs", 0) / report["k"]


# --- DSIR features: the reference package's buckets exactly ---------------------------

def test_hash_vectors_match_the_reference_definition():
    assert sha256_bucket("alice", 10_000) == 6720
    assert sha256_bucket("alice went", 10_000) == 114
    ids, words = NgramHasher().ids("Alice went to the store")
    assert words == 5 and len(ids) == 9  # 5 unigrams + 4 bigrams
    assert ids[0] == 6720 and ids[5] == 114


def test_word_punct_tokenisation():
    assert word_punct("Hello, World!! x_1 = a.b") == ["hello", ",", "world", "!!", "x_1", "=",
                                                      "a", ".", "b"]


def test_features_equal_the_reference_package_on_real_text():
    reference = pytest.importorskip("data_selection.hashed_ngram_dsir")
    prose, code = _prose_and_code()
    hasher = NgramHasher()
    for text in prose[:40] + code[:40] + ["Ünïcödé — “quotes” naïve café", ""]:
        expected = reference.get_ngram_counts(text, n=2, num_buckets=10_000)
        assert np.array_equal(hasher.counts([text]), expected)


def _plain_features(texts: list[str], ngrams: int = 2, hash: str = "sha256") -> list[int]:
    """The definition, one text and one n-gram at a time: regex tokens, strings, hashes."""
    from peftune.select.ngrams import HASHES, ngram_strings

    bucket = HASHES[hash]
    return [bucket(gram, 10_000) for text in texts
            for gram in ngram_strings(word_punct(text), ngrams)]


def test_character_classes_are_the_regex_classes_on_every_code_point():
    import re

    from peftune.select.wordpunct import OTHER, SPACE, WORD, char_class

    chars = [chr(c) for c in range(0x110000)]
    words = set(re.findall(r"\w", "".join(chars)))
    spaces = set(re.findall(r"\s", "".join(chars)))
    expected = [WORD if c in words else SPACE if c in spaces else OTHER for c in chars]
    assert [char_class(c) for c in chars] == expected


def test_vectorised_features_equal_the_definition_on_awkward_text():
    """Tokens of a chunk found at once with numpy equal the regex's per text: every length
    class of token key (1-8, 9-16 ASCII characters, longer, not ASCII), case changes that
    change lengths, spaces of every kind, NULs, lone surrogates, empty texts."""
    rng = random.Random(0)
    alphabet = list("aZ_09 .,;(\t\n\x00\x1c\u3000éΣςİß😀\ud800") + ["abcdefgh", "ijklmnopq"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
             for _ in range(600)]
    texts += ["", "   ", "Σ ΣΑΣ ΟΔΟΣ", "x" * 40, "12345678 123456789 1234567890123456 " * 3]
    prose, code = _prose_and_code()
    texts += prose[:100] + code[:100]
    for ngrams, hash in ((2, "sha256"), (1, "sha256"), (2, "crc32")):
        hasher = NgramHasher(ngrams=ngrams, hash=hash)
        for size in (1, 7, 256):  # chunks of texts, each seeing the tables the last ones left
            for start in range(0, len(texts), size):
                chunk = texts[start:start + size]
                ids, sizes, words = hasher.featurize(chunk)
                assert ids.tolist() == _plain_features(chunk, ngrams, hash)
                assert words.tolist() == [len(word_punct(t)) for t in chunk]
                assert sizes.tolist() == [len(_plain_features([t], ngrams, hash)) for t in chunk]


@pytest.mark.parametrize("width", [1, 2])
def test_int_table_matches_a_dict(width):
    from peftune.select.hashtable import IntTable

    rng = np.random.default_rng(width)
    table, reference = IntTable(4, width=width), {}
    for _ in range(30):  # grows from 16 slots to thousands
        keys = rng.integers(1, 1 << 20, size=(rng.integers(1, 400), width), dtype=np.uint64)
        keys = keys.reshape(-1) if width == 1 else keys
        values, slots = table.find(keys)
        expected = [reference.get(tuple(np.atleast_1d(k).tolist()), -1) for k in keys]
        assert values.tolist() == expected
        missing = values < 0
        new, first = np.unique(keys[missing], return_index=True, axis=0)
        fresh = rng.integers(0, 1 << 40, size=len(new))
        table.add(new, fresh, slots[missing][first])
        reference.update(zip([tuple(np.atleast_1d(k).tolist()) for k in new], fresh.tolist(),
                             strict=True))
        assert len(table) == len(reference)


def test_parse_lines_reads_good_lines_and_leaves_the_rest_to_the_careful_path():
    from peftune.select.pool import parse_lines

    good = [b'{"text": "a", "n": 1}', b'{"text": "caf\xc3\xa9 \\ud800"}', b'{"a": NaN}\r',
            b'{"b": [1, {"c": null}]}  ']
    assert parse_lines(good) == [json.loads(line) for line in good]
    for bad in (b'\xef\xbb\xbf{"text": "bom"}', b'{"text": "caf\xe9"}', b' {"text": "x"}',
                b'{"text": "x"} y', b'[1, 2]', b'{"text": ', b'{"a": 1}{"b": 2}'):
        assert parse_lines([good[0], bad]) is None, bad


def test_chunk_spans_skip_blank_lines_across_read_blocks(tmp_path, monkeypatch):
    import peftune.select.pool as pool

    rng = random.Random(3)
    lines = [rng.choice([b"", b" \t", b"\r", b' {"i": %d}' % i, b'{"i": %d}' % i])
             for i in range(300)]
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n  ")  # and a last line that is blank, unended
    monkeypatch.setattr(pool, "CHUNK_ROWS", 7)
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    for block in (1, 5, 64, 1 << 22):
        monkeypatch.setattr(pool, "SPAN_BLOCK", block)
        chunks = list(pool.iter_chunks([path], ["p.jsonl"], key="k", lazy=True))
        assert [(n, line) for c in chunks for n, line in zip(c.load().places, c.payloads,
                                                          strict=True)] == numbered
        assert all(len(c.payloads) == 7 for c in chunks[:-1])


# --- DSIR selection -------------------------------------------------------------------

def test_dsir_selects_the_target_domain(mixture, tmp_path):
    report = _select(mixture, tmp_path / "out")
    assert _precision(report) >= 0.9
    assert report["kl"]["reduction"] > report["kl"]["random_reduction"] + 0.1
    assert report["labels"]["pool"] == {"code": 700, "docs": 250}


def test_gumbel_sampling_is_reproducible_and_seeded(mixture, tmp_path):
    a = _select(mixture, tmp_path / "a", seed=3)
    b = _select(mixture, tmp_path / "b", seed=3)
    c = _select(mixture, tmp_path / "c", seed=4)
    read = lambda d: (tmp_path / d / "selected.jsonl").read_bytes()  # noqa: E731
    assert read("a") == read("b")
    assert read("a") != read("c")
    assert a["kl"] == b["kl"] and c["k"] == 150


def test_top_k_and_length_options(mixture, tmp_path):
    top = _select(mixture, tmp_path / "top", sampling="top_k")
    scores = np.load(tmp_path / "top" / "scores.npy")
    assert top["scores"]["selected_min"] == pytest.approx(np.sort(scores)[-150])
    short = _select(mixture, tmp_path / "short", min_length=40)
    lengths = [len(word_punct(json.loads(line)["text"]))
               for line in (tmp_path / "short" / "selected.jsonl").read_text().splitlines()]
    assert min(lengths) >= 40 and short["lengths"]["selected"]["p10"] >= 40
    assert np.isnan(np.load(tmp_path / "short" / "scores.npy")).sum() == \
        sum(len(word_punct(r["text"])) < 40 for r in mixture["rows"])
    _select(mixture, tmp_path / "norm", length_normalize=True, sampling="top_k")


def test_several_targets_with_weights(mixture, tmp_path):
    prose, code = _prose_and_code()
    code_target = tmp_path / "code_target.jsonl"
    code_target.write_text("".join(json.dumps({"text": t}) + "\n" for t in code[700:]))
    report = _select(mixture, tmp_path / "out", k=100, sampling="top_k",
                     target=[str(mixture["target"]), str(code_target)], target_weights=[3, 1])
    assert report["labels"]["selected"]["docs"] >= 70  # 75 rows chose for the prose target
    assert report["labels"]["selected"]["code"] >= 20
    assert split_k(100, [3, 1]) == [75, 25]


def test_top_k_and_choose_break_ties_by_row():
    keys = np.array([1.0, 5, 5, 3, -np.inf, 5])
    assert top_k(keys, 2).tolist() == [1, 2]
    assert top_k(keys, 5).tolist() == [1, 2, 5, 3, 0]
    two = np.stack([keys, np.array([9.0, 0, 0, 8, -np.inf, 7])], axis=1)
    assert choose(two, [2, 2]).tolist() == [0, 1, 2, 3]


def test_gumbel_noise_depends_only_on_the_row():
    rows = np.array([3, 70_000, 5, 131_072])
    noise = gumbel_noise(7, rows)
    assert np.array_equal(gumbel_noise(7, rows[::-1]), noise[::-1])
    assert not np.array_equal(gumbel_noise(8, rows), noise)


def test_kl_reduction_metric():
    target = np.array([1000, 1000, 0, 0])
    raw = np.array([500, 500, 500, 500])
    assert kl_reduction(target, raw, target * 3) > 0.5
    assert kl_reduction(target, raw, raw * 2) == pytest.approx(0.0)


# --- ZIP-FIT --------------------------------------------------------------------------

def test_gzip_lengths_are_byte_identical_to_gzip_compress():
    rng = random.Random(0)
    for level in range(1, 10):
        size = compressed_size("gzip", level)
        for n in (0, 1, 57, 4096):
            data = bytes(rng.randrange(40, 120) for _ in range(n))
            assert size(data) == len(gzip.compress(data, compresslevel=level))
    assert compressed_size("zlib", 6)(b"abc" * 50) == len(zlib.compress(b"abc" * 50, 6))


@pytest.mark.parametrize("compressor", ["gzip", "zlib", "lz4", "zstd"])
def test_zipfit_scores_equal_the_formula(compressor):
    if not compressor_available(compressor):
        pytest.skip(f"{compressor} is not installed")
    prose, code = _prose_and_code()
    rng = random.Random(1)
    targets = [t.encode() for t in rng.sample(prose, 12)]
    docs = [t.encode() for t in rng.sample(prose + code, 25)]
    level = 1 if compressor in ("gzip", "zlib", "zstd") else 0
    direct = {"gzip": lambda b: len(gzip.compress(b, compresslevel=level)),
              "zlib": lambda b: len(zlib.compress(b, level))}
    if compressor == "lz4":
        import lz4.frame
        direct["lz4"] = lambda b: len(lz4.frame.compress(b, compression_level=level))
    if compressor == "zstd":
        import zstandard
        direct["zstd"] = lambda b: len(zstandard.ZstdCompressor(level=level).compress(b))
    c = direct[compressor]
    scores = ZipFitScorer(targets, compressor=compressor, level=level).scores(docs)
    for doc, score in zip(docs, scores, strict=True):
        expected = 1 - sum(ncd(c(doc), c(y), c(doc + y)) for y in targets) / len(targets)
        assert abs(score - expected) <= 1e-12


@pytest.mark.skipif(not compressor_available("lz4"), reason="lz4 is not installed")
@pytest.mark.parametrize("level", [0, 2, -3])
def test_lz4_block_lengths_equal_lz4_frame_compress(level):
    """The fast lz4 path (each pair a block of one open frame) must give exactly
    `len(lz4.frame.compress(data))`: real pairs, incompressible bytes (stored blocks), sizes
    around lz4's 4 KiB table reset and the 64 KiB block, and after many inputs."""
    import lz4.frame

    from peftune.select.zipfit import Lz4FrameLengths

    prose, code = _prose_and_code()
    rng = random.Random(level)
    fast = Lz4FrameLengths.make(level, [t.encode() for t in prose[:20]])
    assert fast is not None
    texts = [t.encode() for t in prose + code]
    data = [rng.choice(texts) + rng.choice(texts) for _ in range(3000)]
    blob = b"\n".join(texts)
    for size in (1, 12, 13, 100, 4095, 4096, 4097, 40000, 65535, 65536):
        data += [rng.randbytes(size), blob[:size], bytes(rng.choice(b"ab") for _ in range(size)),
                 rng.randbytes(size // 2) + blob[:size - size // 2]]
    rng.shuffle(data)
    expected = [len(lz4.frame.compress(d, compression_level=level)) for d in data]
    assert fast.lengths(data).tolist() == expected
    # The scorer: a row over one block takes lz4.frame.compress itself, with the same score.
    targets = [t.encode() for t in rng.sample(prose, 6)]
    docs = [t.encode() for t in rng.sample(code, 5)] + [blob[:70000]]
    scorer = ZipFitScorer(targets, compressor="lz4", level=level)
    assert scorer._lz4 is not None
    c = lambda b: len(lz4.frame.compress(b, compression_level=level))  # noqa: E731
    for doc, score in zip(docs, scorer.scores(docs), strict=True):
        expected = 1 - sum(ncd(c(doc), c(y), c(doc + y)) for y in targets) / len(targets)
        assert abs(score - expected) <= 1e-12


def test_zipfit_scores_repeated_rows_once_with_the_same_scores():
    prose, code = _prose_and_code()
    targets = [t.encode() for t in prose[:8]]
    docs = [t.encode() for t in code[:6]]
    scorer = ZipFitScorer(targets, compressor="gzip", level=1)
    repeated = [docs[i] for i in (0, 1, 0, 2, 3, 3, 4, 5, 0)]
    expected = [scorer.scores([doc])[0] for doc in repeated]
    assert scorer.scores(repeated).tolist() == expected


def test_distinct_is_np_unique_up_to_which_occurrence():
    from peftune.select.hashtable import distinct

    rng = np.random.default_rng(0)
    for shape in ((500,), (500, 2), (1,), (0,)):
        keys = rng.integers(1, 40, size=shape).astype(np.uint64)
        new, first, inverse = distinct(keys)
        axis = None if keys.ndim == 1 else 0
        unique, unique_inverse = np.unique(keys, return_inverse=True, axis=axis)
        assert np.array_equal(new, unique)
        assert np.array_equal(inverse, unique_inverse.reshape(-1))
        assert np.array_equal(keys[first], new)


def test_zipfit_prefers_the_target_domain(mixture, tmp_path):
    """ZIP-FIT favours short rows on this text (visible in the report's lengths); it still
    picks prose well above its 26% share of the pool."""
    report = _select(mixture, tmp_path / "z", method="zipfit", target_sample=100)
    assert _precision(report) >= 0.4
    assert report["lengths"]["selected"]["p50"] < report["lengths"]["pool"]["p50"]
    assert report["pairs_per_s"] > 0 and report["zipfit_targets"] == 100
    sampled = _select(mixture, tmp_path / "s", method="zipfit", target_sample=10)
    assert sampled["zipfit_targets"] == 10


# --- streaming, output and parallelism -------------------------------------------------

@pytest.mark.parametrize("method", ["dsir", "zipfit"])
def test_num_proc_gives_identical_results(mixture, tmp_path, method):
    keys = {"target_sample": 20} if method == "zipfit" else {}
    big = {**mixture, "pool": mixture["big"]}
    _select(big, tmp_path / "one", method=method, num_proc=1, **keys)
    _select(big, tmp_path / "two", method=method, num_proc=2, **keys)
    for name in ("selected.jsonl", "scores.npy"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_two_ranks_give_the_single_process_result(mixture, tmp_path):
    """Under torchrun with 2 CPU processes the ranks take disjoint shards; the merged
    per-rank top-k is exactly the one-process selection."""
    assert 3 * len(mixture["rows"]) > 2 * CHUNK_ROWS  # both ranks get chunks
    args = ["select-data", "--method", "dsir", "--pool", str(mixture["big"]), "--target",
            str(mixture["target"]), "--k", "150", "--label-field", "label", "--quiet"]
    launched = run_cli(*args, "--out", tmp_path / "ranks", python_args=TORCHRUN_2, timeout=180)
    assert launched.returncode == 0, launched.stderr[-2000:]
    _select({**mixture, "pool": mixture["big"]}, tmp_path / "single")
    assert json.loads((tmp_path / "ranks" / "report.json").read_text())["ranks"] == 2
    for name in ("selected.jsonl", "scores.npy"):
        assert (tmp_path / "ranks" / name).read_bytes() == \
            (tmp_path / "single" / name).read_bytes()


def test_selected_rows_are_byte_identical_and_in_pool_order(tmp_path):
    prose, code = _prose_and_code()
    lines = []
    for i, text in enumerate(prose[:40] + code[:40]):
        row = {"text": text, "id": i}
        # Unusual but valid JSON: spacing, escapes, key order; a CRLF ending.
        line = json.dumps(row, ensure_ascii=(i % 2 == 0), indent=None, separators=(" ,", ": "))
        lines.append(line.encode() + (b"\r\n" if i % 5 == 0 else b"\n"))
    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(b"".join(lines) + b"\n")  # and a trailing blank line
    target = tmp_path / "t.jsonl"
    target.write_text("".join(json.dumps({"text": t}) + "\n" for t in prose[50:60]))
    cfg = SelectConfig(method="zipfit", pool=[str(pool)], target=[str(target)], k=30)
    run_select(cfg, out=tmp_path / "out", quiet=True)
    written = (tmp_path / "out" / "selected.jsonl").read_bytes().splitlines(keepends=True)
    assert len(written) == 30 and set(written) <= set(lines)
    ids = [json.loads(line)["id"] for line in written]
    assert ids == sorted(ids)
    assert len(np.load(tmp_path / "out" / "scores.npy")) == 80


def test_other_sources_several_pools_and_rendered_examples(tmp_path):
    import pandas as pd

    prose, code = _prose_and_code()
    pd.DataFrame({"prompt": ["Explain"] * 30, "response": prose[:30]}).to_parquet(
        tmp_path / "a.parquet")
    pd.DataFrame({"prompt": ["Write code"] * 30, "response": code[:30]}).to_csv(
        tmp_path / "b.csv", index=False)
    target = tmp_path / "t.jsonl"
    target.write_text("".join(json.dumps({"text": t}) + "\n" for t in prose[40:600]))
    cfg = SelectConfig(method="dsir", pool=[str(tmp_path / "a.parquet"), str(tmp_path / "b.csv")],
                       target=[str(target)], k=20, format="instruction", target_text_field="text",
                       sampling="top_k")
    report = run_select(cfg, out=tmp_path / "out", quiet=True)
    rows = read_jsonl(tmp_path / "out/selected.jsonl")
    assert report["pool_size"] == 60 and len(rows) == 20
    assert sum(r["prompt"] == "Explain" for r in rows) >= 16  # half the pool is "Explain"


def test_report_plot_and_resolved_config(mixture, tmp_path):
    report = _select(mixture, tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "scores.npy", "scores.png",
                                                     "select.yaml", "selected.jsonl"]
    assert set(report["timings"]) >= {"targets", "score", "select", "write", "total"}
    assert report["docs_per_s"] > 0
    assert {"p10", "p50", "p90", "mean"} <= set(report["lengths"]["pool"])
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    again = run_cli("select-data", out / "select.yaml", f"select.out={tmp_path / 'again'}",
                    "--quiet")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again/selected.jsonl").read_bytes() == \
        (out / "selected.jsonl").read_bytes()


def test_a_bad_row_on_one_rank_stops_every_rank_with_its_line(mixture, tmp_path):
    lines = mixture["big"].read_bytes().splitlines(keepends=True)
    lines[CHUNK_ROWS + 5] = b'{"body": "no text"}\n'  # in chunk 1: rank 1's share
    pool = tmp_path / "bad.jsonl"
    pool.write_bytes(b"".join(lines))
    launched = run_cli("select-data", "--method", "dsir", "--pool", pool, "--target",
                       mixture["target"], "--k", "10", "--out", tmp_path / "out", "--quiet",
                       python_args=TORCHRUN_2, timeout=180)
    expected = (f"error: select.pool: {pool}:{CHUNK_ROWS + 6}: missing field; the row has: "
                "body (field 'text')")
    # Every rank stops with this line; torchrun may end the second rank before it prints.
    assert launched.stderr.count(expected) >= 1, launched.stderr[-2000:]
    assert "exitcode  : 2" in launched.stderr or "exitcode: 2" in launched.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_pool_workers_do_not_keep_the_parents_sigterm_handler(monkeypatch):
    """The clean-up handler, inherited by forked workers, made a worker ignore the pool's
    SIGTERM at shutdown now and then, and the run hang."""
    import signal

    from peftune.select import scoring
    from peftune.select.output import cleanup_on_sigterm

    monkeypatch.setattr(scoring, "score_chunk",
                        lambda scorer, chunk: signal.getsignal(signal.SIGTERM))
    with cleanup_on_sigterm():
        handlers = list(scoring.score_chunks(object(), [0, 1, 2], processes=2))
    assert handlers == [signal.SIG_DFL] * 3


def test_a_plot_that_fails_on_its_thread_is_reported(tmp_path):
    from peftune.select.report import PlotThread

    plotter = PlotThread()
    plotter.warm()
    plotter.draw(tmp_path / "no-such-dir" / "scores.png", np.arange(5.0), np.array([4]),
                 SelectConfig(method="dsir", pool=["p"], target=["t"], k=1))
    with pytest.raises(FileNotFoundError):
        plotter.wait()


def test_text_keys_mirror_the_data_section():
    from typing import get_args

    from peftune.recipe.schema import DataSection
    from peftune.select.training import _INHERITED

    for key in _INHERITED:
        mine, theirs = SelectConfig.model_fields[key], DataSection.model_fields[key]
        if key == "format":  # every format selection reads is a data format (not pairs)
            assert set(get_args(mine.annotation)) == set(get_args(theirs.annotation)) - {
                "preference", "kto"} and mine.default == theirs.default
            continue
        assert (mine.annotation, mine.default) == (theirs.annotation, theirs.default), key
