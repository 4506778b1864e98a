"""The data layer: sources, label masks, packing exactness, batching, cache, splits, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from peftune.data import (
    FORMATS,
    Row,
    build_datasets,
    micro_batches,
    pack_rows,
    packing_efficiency,
    per_example_losses,
)
from peftune.data.packing import best_fit_decreasing
from peftune.data.sources import iter_rows, resolve_source
from peftune.errors import InputError
from peftune.models import build_tiny_model
from peftune.recipe.schema import DataSection

TEXTS = ["the cat sat", "a much longer line of text, with punctuation!", "x y",
         "naïve café ünïcödé", "short", "0123456789 " * 3, "last one here"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=32, layers=2, heads=4)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def build(tmp_path: Path, tokenizer: Any, seed: int = 0, **fields: Any):
    return build_datasets(DataSection(**fields), tokenizer, seed=seed, cache_dir=tmp_path / "cache")


def targets(tokenizer: Any, ids: np.ndarray, labels: np.ndarray) -> str:
    return tokenizer.decode(ids[labels != -100].tolist())


def error_lines(excinfo: pytest.ExceptionInfo[InputError]) -> list[str]:
    return excinfo.value.lines


# --- sources ---------------------------------------------------------------------------------

def write_source(kind: str, directory: Path, rows: list[dict[str, Any]]) -> str:
    if kind == "jsonl":
        return write_jsonl(directory / "d.jsonl", rows)
    if kind == "json":
        (directory / "d.json").write_text(json.dumps(rows))
        return str(directory / "d.json")
    if kind == "csv":
        with (directory / "d.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return str(directory / "d.csv")
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), directory / "d.parquet")
        return str(directory / "d.parquet")
    import datasets

    dataset = datasets.Dataset.from_list(rows)
    if kind == "datasetdict":
        dataset = datasets.DatasetDict({"train": dataset})
    dataset.save_to_disk(str(directory / "saved"))
    return str(directory / "saved")


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "dataset", "datasetdict"])
def test_every_source_reads_the_same_rows(kind: str, tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"text": text, "id": str(i)} for i, text in enumerate(TEXTS)]
    path = write_source(kind, tmp_path, rows)
    read = list(iter_rows(resolve_source(path, key="data.train"), key="data.train", display=path))
    assert [item.row for item in read] == rows
    first = {"jsonl": f"{path}:1", "json": f"{path}: item 0", "csv": f"{path}:2"}
    assert read[0].location == first.get(kind, f"{path}: row 0")
    splits = build(tmp_path, tokenizer, train=path)
    decoded = [targets(tokenizer, *splits.train[i]) for i in range(len(TEXTS))]
    assert decoded == [t + "</s>" for t in TEXTS]


def test_max_examples_reads_the_first_rows(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    splits = build(tmp_path, tokenizer, train=path, max_examples=3)
    assert len(splits.train) == 3 and splits.stats["rows_read"] == 3
    assert targets(tokenizer, *splits.train[2]) == TEXTS[2] + "</s>"


# --- formats and label masks -----------------------------------------------------------------

def test_text_masks_only_bos(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "hello world"}])
    ids, labels = build(tmp_path, tokenizer, train=path, text_field="body").train[0]
    assert ids.dtype == np.int32 and labels.dtype == np.int32
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert labels[0] == -100 and (labels[1:] == ids[1:]).all()
    assert targets(tokenizer, ids, labels) == "hello world</s>"
    ids, labels = build(tmp_path, tokenizer, train=path, text_field="body", add_eos=False).train[0]
    assert targets(tokenizer, ids, labels) == "hello world"


def test_first_token_is_never_a_target_without_bos(tmp_path: Path, tiny_dir: Path) -> None:
    from tokenizers import processors
    from transformers import AutoTokenizer

    no_bos = AutoTokenizer.from_pretrained(tiny_dir)
    no_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    ids, labels = build(tmp_path, no_bos, train=path).train[0]
    assert no_bos.decode(ids.tolist()) == "hello</s>"
    assert targets(no_bos, ids, labels) == "ello</s>"


def test_instruction_targets_are_response_and_eos(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"q": "Add 2 and 3.", "ctx": "Be brief.", "a": "5"},
            {"q": "Capital of France?", "a": "Paris, of course."}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    splits = build(tmp_path, tokenizer, train=path, format="instruction", prompt_field="q",
                   response_field="a", input_field="ctx",
                   prompt_template="### Q: {prompt}\n{input}\n### A: ")
    ids, labels = splits.train[0]
    assert targets(tokenizer, ids, labels) == "5</s>"
    assert tokenizer.decode(ids.tolist()) == "<s>### Q: Add 2 and 3.\nBe brief.\n### A: 5</s>"
    ids, labels = splits.train[1]
    assert targets(tokenizer, ids, labels) == "Paris, of course.</s>"
    assert tokenizer.decode(ids.tolist()).startswith("<s>### Q: Capital of France?\n\n### A: ")


def test_chat_targets_are_assistant_turns(tmp_path: Path, tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    ids, labels = build(tmp_path, tokenizer, train=path, format="chat").train[0]
    assert tokenizer.decode(ids.tolist()) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert targets(tokenizer, ids, labels) == "hello!<|im_end|>\n4<|im_end|>\n"
    # Each target run is exactly one assistant turn.
    runs = np.flatnonzero(np.diff(np.r_[0, labels != -100, 0]))
    turns = [tokenizer.decode(ids[a:b].tolist())
             for a, b in zip(runs[::2], runs[1::2], strict=True)]
    assert turns == ["hello!<|im_end|>\n", "4<|im_end|>\n"]


def test_sharegpt_rows_read_as_role_and_content(tmp_path: Path, tokenizer: Any) -> None:
    """`conversations` of {"from": "human" | "gpt" | "system" | "tool", "value": ...} train
    exactly as the same conversation written with role and content."""
    plain = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello!"}, {"role": "tool", "content": "42"},
             {"role": "assistant", "content": "It is 42."}]
    speakers = {"system": "system", "user": "human", "assistant": "gpt", "tool": "tool"}
    shared = [{"from": speakers[m["role"]], "value": m["content"]} for m in plain]
    a = build(tmp_path / "a", tokenizer, train=write_jsonl(tmp_path / "a.jsonl", [{"messages": plain}]),
              format="chat")
    b = build(tmp_path / "b", tokenizer,
              train=write_jsonl(tmp_path / "b.jsonl", [{"conversations": shared}]),
              format="chat", messages_field="conversations")
    (ids_a, labels_a), (ids_b, labels_b) = a.train[0], b.train[0]
    assert ids_a.tolist() == ids_b.tolist() and labels_a.tolist() == labels_b.tolist()
    assert targets(tokenizer, ids_b, labels_b) == "hello!<|im_end|>\nIt is 42.<|im_end|>\n"


def test_data_roles_rename_speakers_and_roles(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"conversations": [{"from": "customer", "value": "hi"},
                               {"from": "agent", "value": "hello!"}]},
            {"conversations": [{"role": "customer", "content": "bye"},
                               {"role": "agent", "content": "see you"}]}]
    splits = build(tmp_path, tokenizer, train=write_jsonl(tmp_path / "r.jsonl", rows),
                   format="chat", messages_field="conversations",
                   roles={"customer": "user", "agent": "assistant"})
    assert targets(tokenizer, *splits.train[0]) == "hello!<|im_end|>\n"
    assert targets(tokenizer, *splits.train[1]) == "see you<|im_end|>\n"


# --- packing and padding are exact -----------------------------------------------------------

def variable_texts(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "x", "yy", "the", "of", "and"]
    return [{"text": " ".join(rng.choice(words, int(rng.integers(1, 12))))} for _ in range(n)]


def single_losses(model: Any, batch: dict[str, Any]) -> list[float]:
    """Each example of `batch` run alone, unpadded, in per_example_losses' order."""
    import torch

    losses = []
    for j in range(batch["input_ids"].shape[0]):
        if "position_ids" in batch:
            starts = (batch["position_ids"][j] == 0).nonzero().flatten().tolist()
            spans = zip(starts, [*starts[1:], batch["input_ids"].shape[1]], strict=True)
        else:
            spans = [(0, int(batch["attention_mask"][j].sum()))]
        for begin, end in spans:
            labels = batch["labels"][j, begin:end][None]
            if not (labels != -100).any():
                continue  # a packed row's padding tail
            ids = batch["input_ids"][j, begin:end][None]
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits
            alone = {"labels": labels, "attention_mask": torch.ones_like(ids)}
            losses += per_example_losses(logits, alone)
    return losses


def test_packed_batch_matches_examples_run_alone(tmp_path: Path, tokenizer: Any,
                                                 model: Any) -> None:
    import torch

    path = write_jsonl(tmp_path / "d.jsonl", variable_texts(24))
    splits = build(tmp_path, tokenizer, train=path, max_length=128)
    rows = pack_rows(splits.train, max_length=128, packing=True, seed=0)
    assert any(len(row.lengths) >= 3 for row in rows)
    batches = micro_batches(rows, batch_size=3, pad_id=tokenizer.pad_token_id, seed=0, epoch=0,
                            packing=True)
    batch = next(b for b in batches if (b["labels"][:, -1] == -100).any())  # one with padding
    assert set(batch) == {"input_ids", "labels", "position_ids", "num_tokens"}
    with torch.no_grad():
        packed = per_example_losses(model(input_ids=batch["input_ids"],
                                          position_ids=batch["position_ids"],
                                          use_cache=False).logits, batch)
        leaky = per_example_losses(model(input_ids=batch["input_ids"],
                                         use_cache=False).logits, batch)
    alone = single_losses(model, batch)
    assert len(packed) == len(alone) >= 4
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)
    # Control: without restarting positions the examples see each other and the loss changes.
    assert not np.allclose(leaky, alone, rtol=1e-5, atol=1e-5)


def test_padded_batch_matches_examples_run_alone(tmp_path: Path, tokenizer: Any,
                                                 model: Any) -> None:
    import torch

    path = write_jsonl(tmp_path / "d.jsonl", variable_texts(8))
    splits = build(tmp_path, tokenizer, train=path)
    rows = pack_rows(splits.train, max_length=1024, packing=False, seed=0)
    batch = micro_batches(rows, batch_size=8, pad_id=tokenizer.pad_token_id, seed=0, epoch=0,
                          packing=False)[0]
    assert set(batch) == {"input_ids", "labels", "attention_mask", "num_tokens"}
    assert int(batch["num_tokens"]) == int(batch["attention_mask"].sum())
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    with torch.no_grad():
        padded = per_example_losses(model(input_ids=batch["input_ids"],
                                          attention_mask=batch["attention_mask"],
                                          use_cache=False).logits, batch)
    alone = single_losses(model, batch)
    assert len(padded) == len(alone) == 8
    np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-5)


def test_micro_batches_are_deterministic_and_cover_each_example_once(tmp_path: Path,
                                                                    tokenizer: Any) -> None:
    import torch

    path = write_jsonl(tmp_path / "d.jsonl", variable_texts(40))
    train = build(tmp_path, tokenizer, train=path, max_length=32).train
    for packing in (True, False):
        rows = pack_rows(train, max_length=32, packing=packing, seed=1)
        assert all(len(row) <= 32 and len(row) == sum(row.lengths) for row in rows)
        assert sorted(i for row in rows for i in row.example_indices) == list(range(len(train)))

        def epoch(n: int, seed: int = 1, rows: list = rows, packing: bool = packing) -> list:
            return micro_batches(rows, batch_size=3, pad_id=0, seed=seed, epoch=n, packing=packing)

        first, again, second = epoch(0), epoch(0), epoch(1)
        assert len(first) == -(-len(rows) // 3)
        assert first[-1]["input_ids"].shape[0] == (len(rows) % 3 or 3)  # last partial batch kept
        assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                   for a, b in zip(first, again, strict=True))
        assert all(t.dtype == torch.long for b in first for t in b.values())
        assert [b["input_ids"].tolist() for b in first] != [b["input_ids"].tolist() for b in second]
        # Every example appears exactly once per epoch, whole.
        seen = sorted(tuple(row.input_ids.tolist()) for row in rows)
        in_batches = sorted(tuple(ids[ids != 0].tolist()) for b in second for ids in b["input_ids"])
        assert in_batches == seen


def test_packed_batch_layout() -> None:
    def row(lengths: tuple[int, ...]) -> Row:
        ids = np.arange(10, 10 + sum(lengths), dtype=np.int32)
        labels = ids.copy()
        labels[np.r_[0, np.cumsum(lengths)[:-1]]] = -100
        return Row(ids, labels, lengths, tuple(range(len(lengths))))

    rows = [row((3, 2)), row((7,))]
    (packed,) = micro_batches(rows, batch_size=2, pad_id=0, seed=0, epoch=0, packing=True)
    short = int((packed["input_ids"][:, -1] == 0).nonzero()[0, 0])
    assert packed["position_ids"][short].tolist() == [0, 1, 2, 0, 1, 0, 1]
    assert packed["labels"][short].tolist() == [-100, 11, 12, -100, 14, -100, -100]
    assert packed["input_ids"][short].tolist() == [10, 11, 12, 13, 14, 0, 0]
    with pytest.raises(ValueError, match="packing=True"):
        micro_batches(rows, batch_size=2, pad_id=0, seed=0, epoch=0, packing=False)


def test_best_fit_decreasing_packs_tightly() -> None:
    lengths = np.random.default_rng(0).integers(8, 512, size=3000)
    bins = best_fit_decreasing(lengths, 1024, seed=0)
    assert sorted(i for b in bins for i in b) == list(range(3000))
    assert all(sum(lengths[b]) <= 1024 for b in bins)
    assert lengths.sum() / (len(bins) * 1024) > 0.97


def test_packing_efficiency_is_reported(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", variable_texts(200))
    train = build(tmp_path, tokenizer, train=path, max_length=128).train
    packed = pack_rows(train, max_length=128, packing=True, seed=0)
    unpacked = pack_rows(train, max_length=128, packing=False, seed=0)
    assert packing_efficiency(packed, 128) > 0.95 > packing_efficiency(unpacked, 128)


# --- truncation ------------------------------------------------------------------------------

def test_truncation_and_dropping_untargeted_examples(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a" * 50}, {"text": "b" * 5}])
    splits = build(tmp_path, tokenizer, train=path, max_length=10)
    assert [len(splits.train[i][0]) for i in range(2)] == [10, 7]
    assert splits.stats["truncated"] == 1
    rows = [{"prompt": "a long prompt " * 4, "response": "ok"}, {"prompt": "hi", "response": "ok"}]
    path = write_jsonl(tmp_path / "i.jsonl", rows)
    splits = build(tmp_path, tokenizer, train=path, format="instruction", max_length=16)
    assert len(splits.train) == 1 and splits.stats["dropped_no_target"] == 1
    assert targets(tokenizer, *splits.train[0]) == "ok</s>"


# --- cache -----------------------------------------------------------------------------------

def test_cache_hits_without_tokenizing_and_misses_on_change(
        tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    first = build(tmp_path, tokenizer, train=path)
    assert first.stats["cache_hit"] is False and len(list((tmp_path / "cache").glob("*.npz"))) == 1

    def no_tokenizing(*args: Any) -> None:
        raise AssertionError("tokenized despite a cache hit")

    with monkeypatch.context() as patch:
        patch.setitem(FORMATS, "text", no_tokenizing)
        second = build(tmp_path, tokenizer, train=path)
        assert second.stats["cache_hit"] is True and second.stats["tokenize_seconds"] == 0
        assert (second.train.input_ids == first.train.input_ids).all()
        assert second.stats["rows_read"] == len(TEXTS)
        # max_length is applied after the cache: changing it still hits.
        assert build(tmp_path, tokenizer, train=path, max_length=8).stats["cache_hit"] is True
    assert build(tmp_path, tokenizer, train=path, add_eos=False).stats["cache_hit"] is False
    write_jsonl(Path(path), [{"text": t} for t in TEXTS[:-1]])
    changed = build(tmp_path, tokenizer, train=path)
    assert changed.stats["cache_hit"] is False and len(changed.train) == len(TEXTS) - 1


def test_damaged_cache_entry_is_a_miss(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}])
    build(tmp_path, tokenizer, train=path)
    for entry in (tmp_path / "cache").glob("*.npz"):
        entry.write_bytes(b"not a zip")
    assert build(tmp_path, tokenizer, train=path).stats["cache_hit"] is False
    assert build(tmp_path, tokenizer, train=path).stats["cache_hit"] is True


def test_cache_dir_from_environment(tmp_path: Path, tokenizer: Any,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTUNE_CACHE", str(tmp_path / "env"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}])
    build_datasets(DataSection(train=path), tokenizer, seed=0)
    assert len(list((tmp_path / "env" / "tokenized").glob("*.npz"))) == 1


# --- validation ------------------------------------------------------------------------------

def test_val_ratio_split(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"example {i}"} for i in range(50)])
    splits = build(tmp_path, tokenizer, train=path, val_ratio=0.2, seed=3)
    assert (len(splits.train), len(splits.val)) == (40, 10)
    assert splits.stats["val_examples"] == 10

    def texts(data: Any) -> list[str]:
        return [targets(tokenizer, *data[i]) for i in range(len(data))]

    everything = sorted(texts(splits.train) + texts(splits.val))
    assert everything == sorted(f"example {i}</s>" for i in range(50))
    again = build(tmp_path, tokenizer, train=path, val_ratio=0.2, seed=3)
    assert texts(again.val) == texts(splits.val)
    other_seed = build(tmp_path, tokenizer, train=path, val_ratio=0.2, seed=4)
    assert texts(other_seed.val) != texts(splits.val)
    assert build(tmp_path, tokenizer, train=path).val is None


def test_val_file(tmp_path: Path, tokenizer: Any) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "train me"}] * 3)
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "check me"}, {"text": "and me"}])
    splits = build(tmp_path, tokenizer, train=train, val=val, max_examples=2)
    assert len(splits.train) == 2 and len(splits.val) == 2
    assert targets(tokenizer, *splits.val[1]) == "and me</s>"
    with pytest.raises(InputError) as excinfo:
        build(tmp_path, tokenizer, train=train, val=str(tmp_path / "nope.jsonl"))
    missing = tmp_path / "nope.jsonl"
    assert error_lines(excinfo) == [f"data.val: no such file or directory: {missing}"]


# --- bad input -------------------------------------------------------------------------------

def test_missing_file(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(InputError) as excinfo:
        build(tmp_path, tokenizer, train="x.jsonl")
    assert error_lines(excinfo) == [f"data.train: no such file or directory: x.jsonl (looked for "
                                    f"in {Path.cwd()}: relative paths start where peftune runs)"]


def test_unsupported_extension(tmp_path: Path, tokenizer: Any) -> None:
    (tmp_path / "d.txt").write_text("hello\n")
    with pytest.raises(InputError) as excinfo:
        build(tmp_path, tokenizer, train=str(tmp_path / "d.txt"))
    (line,) = error_lines(excinfo)
    assert "unsupported file type .txt" in line and ".jsonl, .json, .parquet, .csv" in line


def test_bad_rows_are_all_reported_with_locations(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good"}\n{"text": oops}\n{"body": "x"}\n{"text": ""}\n'
                    '{"text": 3}\n[1, 2]\n{"text": "fine"}\n')
    with pytest.raises(InputError) as excinfo:
        build(tmp_path, tokenizer, train=str(path))
    lines = error_lines(excinfo)
    assert lines[:5] == [
        f"{path}:2: invalid JSON: Expecting value (column 10)",
        f"{path}:3: missing field; the row has: body (field 'text')",
        f"{path}:4: empty text (field 'text')",
        f"{path}:5: expected a string, got a number (field 'text')",
        f"{path}:6: expected a JSON object, got a list",
    ]
    assert len(lines) == 5
    assert not list((tmp_path / "cache").glob("*.npz"))


def test_many_bad_rows_are_summarised(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": i} for i in range(25)])
    with pytest.raises(InputError) as excinfo:
        build(tmp_path, tokenizer, train=path)
    lines = error_lines(excinfo)
    assert len(lines) == 11
    assert lines[10] == "... and 15 more bad rows (data.on_bad_row: skip leaves bad rows out)"


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_a_field_missing_from_every_row_is_one_line(tmp_path: Path, tokenizer: Any,
                                                     on_bad_row: str) -> None:
    """Pointing a recipe at a new dataset with the wrong field: one line naming the field,
    the key, what the rows hold and the format that fits them, not one line per row."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": "a"} for i in range(25)])
    with pytest.raises(InputError) as excinfo:
        build(tmp_path, tokenizer, train=path, on_bad_row=on_bad_row)
    assert error_lines(excinfo) == [
        f"data.train: {path}: no row has the field 'text' (data.text_field, format text); the "
        "first row's fields: answer, question; set data.text_field to the one that holds it, "
        "or data.format: instruction with prompt_field and response_field"]
    chats = write_jsonl(tmp_path / "c.jsonl", [{"messages": []}, {"messages": []}])
    with pytest.raises(InputError) as excinfo:
        build(tmp_path, tokenizer, train=chats, on_bad_row=on_bad_row)
    assert error_lines(excinfo)[0].endswith("or data.format: chat for conversations")


def test_skip_bad_rows(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good"}\nnot json\n{"text": null}\n\n{"text": "fine"}\n')
    splits = build(tmp_path, tokenizer, train=str(path), on_bad_row="skip")
    assert len(splits.train) == 2
    assert splits.stats["rows_read"] == 4 and splits.stats["rows_skipped"] == 2
    assert splits.stats["bad_rows"][1] == f"{path}:3: expected a string, got null (field 'text')"


def test_all_rows_bad_and_skipped(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": None}])
    with pytest.raises(InputError, match="no usable examples"):
        build(tmp_path, tokenizer, train=path, on_bad_row="skip")


def test_chat_bad_rows(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"messages": []}, {"messages": [{"role": "robot", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "hi"}]}, {"messages": "x"},
            {"messages": [{"role": "assistant", "content": "Hello!"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(InputError) as excinfo:
        build(tmp_path, tokenizer, train=path, format="chat")
    assert error_lines(excinfo)[:5] == [
        f"{path}:1: empty list of messages (field 'messages')",
        f"{path}:2: message 0: unknown role 'robot'; use system, user, assistant, tool "
        "(data.roles renames others) (field 'messages')",
        f"{path}:3: no assistant message, so nothing to train on (field 'messages')",
        f"{path}:4: expected a list of messages, got a string that is not JSON (field 'messages')",
        f"{path}:5: the only assistant message opens the conversation (no user turn before it "
        "to answer), so nothing to train on (field 'messages')",
    ]


def test_chat_needs_a_chat_template(tmp_path: Path, tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_dir)
    plain.chat_template = None
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(InputError) as excinfo:
        build(tmp_path, plain, train=path, format="chat")
    (line,) = error_lines(excinfo)
    assert line.startswith("data.format: chat needs a tokenizer with a chat template")
    plain.chat_template = ("{% for m in messages %}{{ m['content'] }}"
                           "{% if loop.last %}.{% endif %}{% endfor %}")
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    with pytest.raises(InputError, match=r"d\.jsonl:1: .*not prefix-consistent"):
        build(tmp_path, plain, train=write_jsonl(tmp_path / "d.jsonl", rows), format="chat",
              on_bad_row="skip")


def test_bad_prompt_template(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(InputError, match=r"data.prompt_template: unknown placeholder \{input\}"):
        build(tmp_path, tokenizer, train=path, format="instruction",
              prompt_template="{prompt} {input}")


def test_json_that_is_not_a_list(tmp_path: Path, tokenizer: Any) -> None:
    (tmp_path / "d.json").write_text('{"text": "one object"}')
    with pytest.raises(InputError, match="expected a JSON list of objects, got an object"):
        build(tmp_path, tokenizer, train=str(tmp_path / "d.json"))


def test_prompts_longer_than_max_length_say_so_and_left_truncation_keeps_responses(
        tmp_path: Path, tokenizer: Any) -> None:
    """Instruction rows whose prompts fill max_length: one line with the lengths and both ways
    out; with data.truncation: left each example keeps its last max_length tokens, so the
    response and EOS stay targets and the cut start of the prompt goes."""
    rows = [{"prompt": "context " * 20 + f"question {i}?", "response": f"answer {i}"}
            for i in range(6)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(InputError) as excinfo:
        build(tmp_path, tokenizer, train=path, format="instruction", max_length=64)
    (line,) = error_lines(excinfo)
    assert line.startswith(f"data.train: {path}: 6 of 6 examples have no target token within "
                           "data.max_length=64 (their prompts fill it); raise data.max_length "
                           "(the longest example has ")
    assert line.endswith("or set data.truncation: left to cut the start of long prompts and "
                         "keep the response")
    splits = build(tmp_path, tokenizer, train=path, format="instruction", max_length=64,
                   truncation="left")
    assert len(splits.train) == 6
    for i in range(6):
        ids, labels = splits.train[i]
        assert len(ids) == 64 and labels[0] == -100
        assert targets(tokenizer, ids, labels) == f"answer {i}</s>"
        assert tokenizer.decode(ids.tolist()).endswith(f"question {i}?\nanswer {i}</s>")
