"""Weighted data mixing: `data.train: [{path, weight, <format keys>}, ...]` (peftune/data/mix.py).

The draw (shares, determinism by seed, a new draw each epoch, upsampling) is checked on the
mix itself; one short run on the tiny model checks that sources of different formats train
together and that summary.json records the realised mix; resume stays bitwise; and every
bad mix is one line, exit 2, nothing written."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import (
    NO_DEBUG,
    assert_one_error_line,
    assert_resume_matches_uninterrupted,
    make_pairs,
    make_text_rows,
    run_cli,
    train_in_process,
    write_jsonl,
    write_recipe,
)

from peftune.data import MixSource, TokenizedSet, TrainingMix
from peftune.data.mix import draw_counts


@pytest.fixture(scope="module")
def mix_data(tmp_path_factory) -> dict[str, Path]:
    """40 text rows, 6 instruction rows (other field names), 10 more text rows."""
    root = tmp_path_factory.mktemp("mix")
    qa = [{"q": f"say {w}", "a": f"{w} {w}"} for w in ("alpha", "beta", "gamma", "delta",
                                                       "epsilon", "zeta")]
    return {"text": write_jsonl(root / "text.jsonl", make_text_rows(40, seed=0)),
            "qa": write_jsonl(root / "qa.jsonl", qa),
            "small": write_jsonl(root / "small.jsonl", make_text_rows(10, seed=2))}


def two_sources(mix_data: dict[str, Path], weights: tuple[float, float] = (1, 3)) -> list[dict]:
    """The text rows and the instruction rows (their own format keys), weighted."""
    return [{"path": str(mix_data["text"]), "weight": weights[0]},
            {"path": str(mix_data["qa"]), "weight": weights[1], "format": "instruction",
             "prompt_field": "q", "response_field": "a"}]


def synthetic_mix(sizes: list[int], weights: list[float], *, seed: int = 0,
                  packing: bool = False) -> TrainingMix:
    """A mix of len(sizes) sources of examples 2..11 tokens long, no tokenizer needed."""
    rng = np.random.default_rng(1)
    examples = [(np.arange(n, dtype=np.int32), np.arange(n, dtype=np.int32))
                for n in rng.integers(2, 12, size=sum(sizes))]
    ends = np.cumsum(sizes).tolist()
    sources = [MixSource(f"data.train[{i}]", f"s{i}.jsonl", float(w), start, stop)
               for i, (w, start, stop) in enumerate(zip(weights, [0, *ends[:-1]], ends,
                                                        strict=True))]
    return TrainingMix(TokenizedSet.from_examples(examples), sources, seed=seed,
                       max_length=16, packing=packing)


def source_of(mix: TrainingMix, drawn: np.ndarray) -> np.ndarray:
    return np.searchsorted([s.stop for s in mix.sources], drawn, side="right")


# ---- the draw --------------------------------------------------------------------------

def test_draw_counts_follow_the_weights_and_add_up():
    assert draw_counts([100, 10], [3, 1]) == [83, 27]  # 82.5 and 27.5: the tie to the first
    assert draw_counts([50, 50, 50], [1, 1, 1]) == [50, 50, 50]
    assert draw_counts([10, 20], [0, 1]) == [0, 30]
    counts = draw_counts([7, 300, 41], [0.2, 0.5, 0.3])
    assert sum(counts) == 348
    assert all(abs(c - 348 * w) < 1 for c, w in zip(counts, [0.2, 0.5, 0.3], strict=True))


def test_the_realised_draw_matches_the_weights_and_upsamples_a_small_source():
    mix = synthetic_mix([60, 8], [1, 1])  # an epoch of 68: 34 from each
    drawn = mix.draw(0)
    assert Counter(source_of(mix, drawn).tolist()) == {0: 34, 1: 34}
    small = Counter(drawn[source_of(mix, drawn) == 1].tolist())
    assert set(small) == set(range(60, 68))  # every example of the small source ...
    assert sorted(small.values()) == [4, 4, 4, 4, 4, 4, 5, 5]  # ... 34/8 times, cycling
    big = drawn[source_of(mix, drawn) == 0]
    assert len(set(big.tolist())) == 34  # the big one is cut: 34 distinct of its 60
    report = mix.report(epochs=1)
    assert [r["share"] for r in report] == [0.5, 0.5]
    assert [r["repeats"] for r in report] == [round(34 / 60, 4), 4.25]
    lengths = mix.data.lengths
    tokens = [int(lengths[drawn[source_of(mix, drawn) == i]].sum()) for i in (0, 1)]
    assert report[1]["token_share"] == round(tokens[1] / sum(tokens), 6)


def test_the_draw_is_fixed_by_seed_and_epoch_and_differs_across_epochs():
    first, again = synthetic_mix([30, 12], [2, 1]), synthetic_mix([30, 12], [2, 1])
    assert np.array_equal(first.draw(0), again.draw(0))
    assert np.array_equal(first.draw(3), again.draw(3))
    assert not np.array_equal(first.draw(0), first.draw(1))
    assert not np.array_equal(first.draw(0), synthetic_mix([30, 12], [2, 1], seed=1).draw(0))
    # each epoch the same counts per source, from another permutation
    assert Counter(source_of(first, first.draw(1)).tolist()) == {0: 28, 1: 14}


@pytest.mark.parametrize("packing", [False, True])
def test_an_epochs_rows_hold_its_draw_and_are_counted_without_packing_twice(packing):
    mix = synthetic_mix([30, 12], [2, 1], packing=packing)
    for epoch in (0, 1):
        expected = mix.row_count(epoch)
        rows = mix.rows(epoch)
        assert len(rows) == expected
        held = sorted(i for row in rows for i in row.example_indices)
        assert held == sorted(mix.draw(epoch).tolist())  # indices in the whole mix
        for row in rows:  # each example's tokens are the mix's own example's
            pieces = np.split(row.input_ids, np.cumsum(row.lengths)[:-1])
            for index, piece in zip(row.example_indices, pieces, strict=True):
                assert np.array_equal(piece, mix.data[index][0])


def test_total_steps_counts_each_epochs_own_size():
    from peftune.recipe.schema import Recipe
    from peftune.train.setup import total_steps

    recipe = Recipe.model_validate({"model": "m", "data": {"train": "t.jsonl"}, "train": {
        "epochs": 2.5, "batch_size": 4, "grad_accum": 2}})
    assert total_steps(recipe, micro_batches_per_epoch=[10, 12, 8]) == 13  # (10 + 12 + 4) / 2
    assert total_steps(recipe, micro_batches_per_epoch=10) == 13  # 25 / 2, as before


# ---- the recipe ------------------------------------------------------------------------

def test_a_mix_validates_and_dumps_what_it_sets(tmp_path, tiny_model_dir, mix_data):
    from peftune.recipe import load_recipe, recipe_to_yaml
    from peftune.recipe.schema import DataSection, DataSource

    sources = two_sources(mix_data)
    del sources[0]["weight"]  # weight 1 when left out, and written out in the dump
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", model=tiny_model_dir,
                                      data=mix_data["text"], out=tmp_path / "run",
                                      data_keys={"train": sources, "val": [str(mix_data["small"])]}))
    dumped = yaml.safe_load(recipe_to_yaml(recipe))["data"]
    assert dumped["train"] == [{"path": str(mix_data["text"]), "weight": 1.0},
                               {**two_sources(mix_data)[1], "weight": 3.0}]
    assert dumped["val"] == [{"path": str(mix_data["small"])}]
    assert DataSection.model_validate(dumped) == recipe.data
    # the format keys of a source mirror the data section's
    for key in set(DataSource.model_fields) - {"path", "weight"}:
        mine, theirs = DataSource.model_fields[key], DataSection.model_fields[key]
        assert (mine.annotation, mine.default) == (theirs.annotation, theirs.default), key
    # sources that all name one format make it data.format (the objective's checks read it)
    pairs = [{"path": "a.jsonl", "format": "preference"}, {"path": "b.jsonl", "format": "preference"}]
    assert DataSection(train=pairs).format == "preference"


def test_a_plain_path_is_unchanged(tmp_path, tiny_model_dir, text_data):
    from peftune.data import build_datasets, pack_rows
    from peftune.models import load_tokenizer
    from peftune.recipe import load_recipe, recipe_to_yaml
    from peftune.train.setup import training_rows

    path = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                        out=tmp_path / "run", train={"epochs": 2, "max_steps": None})
    recipe = load_recipe(path)
    assert yaml.safe_load(recipe_to_yaml(recipe))["data"]["train"] == str(text_data["train"])
    assert recipe.data.sources("train") == [("data.train", recipe.data)]
    splits = build_datasets(recipe.data, load_tokenizer(tiny_model_dir), seed=0)
    assert splits.sources is None
    rows, mix, per_epoch = training_rows(recipe, splits)
    expected = pack_rows(splits.train, max_length=64, packing=True, seed=0)
    assert mix is None and per_epoch == -(-len(expected) // 4)
    assert [(r.example_indices, r.input_ids.tolist()) for r in rows] == \
        [(r.example_indices, r.input_ids.tolist()) for r in expected]


def test_val_ratio_splits_each_source_and_a_val_list_is_read_whole(tiny_model_dir, mix_data):
    from peftune.data import build_datasets
    from peftune.models import load_tokenizer
    from peftune.recipe.schema import DataSection

    tokenizer = load_tokenizer(tiny_model_dir)
    sources = two_sources(mix_data)
    splits = build_datasets(DataSection(train=sources, val_ratio=0.25, max_length=64),
                            tokenizer, seed=0)
    # 40 -> 30 + 10 and 6 -> 4 (+ 2, rounded up from 1.5): the mix draws from what is left
    assert [(s.key, s.stop - s.start) for s in splits.sources] == [("data.train[0]", 30),
                                                                   ("data.train[1]", 4)]
    assert len(splits.val) == 12
    listed = build_datasets(DataSection(train=sources, val=[str(mix_data["small"]), {
        "path": str(mix_data["qa"]), "format": "instruction", "prompt_field": "q",
        "response_field": "a"}], max_length=64), tokenizer, seed=0)
    assert len(listed.val) == 16 and len(listed.train) == 46


def test_a_sources_own_field_is_named_where_it_is_missing(tiny_model_dir, mix_data):
    from peftune.data import build_datasets
    from peftune.errors import InputError
    from peftune.models import load_tokenizer
    from peftune.recipe.schema import DataSection

    sources = [str(mix_data["text"]), {"path": str(mix_data["small"]), "text_field": "body"}]
    with pytest.raises(InputError) as err:
        build_datasets(DataSection(train=sources), load_tokenizer(tiny_model_dir), seed=0)
    (line,) = err.value.lines
    assert line.startswith(f"data.train[1]: {mix_data['small']}: no row has the field 'body' "
                           "(data.train[1].text_field, format text)")


# ---- training --------------------------------------------------------------------------

def test_sources_of_two_formats_train_and_the_summary_records_the_mix(tmp_path, tiny_model_dir,
                                                                       mix_data):
    """40 text rows and 6 instruction rows at 1:3: an epoch of 46 examples, 12 + 34 (the
    instruction rows ~5.7 times each); total_steps counts each epoch's own packed rows."""
    path = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=mix_data["text"],
                        out=tmp_path / "run", data_keys={"train": two_sources(mix_data),
                                                        "packing": False},
                        train={"max_steps": None, "epochs": 0.5, "batch_size": 8})
    built, summary = train_in_process(path)
    assert summary["steps"] == built.total_steps == 3  # ceil(0.5 x 46 rows / 8)
    mix = {m["key"]: m for m in summary["data"]["mix"]}
    assert [m["drawn_per_epoch"] for m in mix.values()] == [12, 34]
    assert [m["share"] for m in mix.values()] == [round(12 / 46, 6), round(34 / 46, 6)]
    assert mix["data.train[1]"]["repeats"] == round(34 / 6, 4)
    assert mix["data.train[0]"]["examples"] == 40 and mix["data.train[0]"]["weight"] == 1.0
    rows = built.mix.rows(0)  # the instruction rows' responses are the only targets there
    assert Counter(built.mix.sources[0].stop <= i for r in rows for i in r.example_indices) \
        == {False: 12, True: 34}
    assert 0 < mix["data.train[1]"]["token_share"] < 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["data"]["mix"] == \
        summary["data"]["mix"]
    assert built.mix.describe().startswith("data mix: 46 examples an epoch: text.jsonl 26.1% "
                                           "(12 of 40, x0.30), qa.jsonl 73.9% (34 of 6, x5.67)")
    card = (tmp_path / "run" / "README.md").read_text()  # the model card lists the sources
    assert f"`{mix_data['text']}` (weight 1.0)" in card and "0.7391 of the examples drawn" in card


def test_a_preference_mix_trains_with_a_precomputed_reference(tmp_path, tiny_model_dir):
    """The reference table covers every example of the mix once; epochs look it up by the
    examples' indices in the mix."""
    root = tmp_path / "pairs"
    sources = [{"path": str(write_jsonl(root / "a.jsonl", make_pairs(12, seed=0))), "weight": 1},
               {"path": str(write_jsonl(root / "b.jsonl", make_pairs(4, seed=3))), "weight": 1}]
    path = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=Path(sources[0]["path"]),
                        out=tmp_path / "run",
                        data_keys={"train": sources, "format": "preference"},
                        train={"objective": {"name": "dpo", "reference": "precomputed"},
                               "max_steps": 2, "batch_size": 4})
    built, summary = train_in_process(path)
    assert built.reference.mode == "precomputed" and len(built.reference.train.table) == 32
    assert [m["drawn_per_epoch"] for m in summary["data"]["mix"]] == [8, 8]  # pairs
    assert summary["steps"] == 2


def test_resume_with_a_mix_is_bitwise(tmp_path, tiny_model_dir, mix_data):
    """14 examples an epoch, 4 micro-batches: the checkpoint at step 3 is mid-epoch, and the
    resumed half runs into the second epoch's draw."""
    sources = [{"path": str(mix_data["small"]), "weight": 1},
               {"path": str(mix_data["qa"]), "weight": 1, "format": "instruction",
                "prompt_field": "q", "response_field": "a"}]
    assert_resume_matches_uninterrupted(
        tmp_path, model=tiny_model_dir, data=mix_data["small"],
        adapter={"method": "lora", "r": 4, "alpha": 8},
        data_keys={"train": sources, "packing": False}, train_keys={"batch_size": 4})


# ---- bad input: one line, exit 2, nothing written --------------------------------------

BAD_MIXES = {
    "negative": ([{"weight": -1}, {}], {}, "data.train[0].weight: must be >= 0, got -1"),
    "not a number": ([{"weight": "3"}, {}], {}, "data.train[0].weight: expected a number"),
    "a boolean": ([{}, {"weight": True}], {}, "data.train[1].weight: expected a number"),
    "all zero": ([{"weight": 0}, {"weight": 0}], {}, "data.train: every source's weight is 0"),
    "a key its format does not read": (
        [{}, {"prompt_field": "q"}], {}, "data.train[1].prompt_field: format text does not "
        "read it (only instruction, preference, kto do)"),
    "a section-wide key": ([{"max_length": 32}, {}], {},
                           "data.train[0]: max_length is section-wide: set it under data:"),
    "an unknown key": ([{"wieght": 2}, {}], {}, "data.train[0]: unknown key 'wieght'"),
    "pairs with plain rows": ([{}, {"format": "preference"}], {},
                              "data.train[1].format: data.train[1] is preference (preference "
                              "pairs) and data.train[0] is text (plain)"),
    "pairs with kto rows": ([{"format": "preference"}, {"format": "kto"}], {},
                            "cannot train together"),
    "selection from a mix": ([{}, {}], {"select": {"method": "dsir", "target": "t.jsonl", "k": 4}},
                             "data.select: selection picks rows from one pool, and "
                             "data.train is a mix of 2 sources"),
    "weights in a validation mix": ([{}, {}], {"val": [{"path": "v.jsonl", "weight": 2}]},
                                    "data.val[0].weight: a validation mix reads each source "
                                    "whole"),
}


@pytest.mark.parametrize("case", list(BAD_MIXES))
def test_a_bad_mix_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, mix_data, case):
    sources, more, expected = BAD_MIXES[case]
    train = [{"path": str(mix_data["text"] if i == 0 else mix_data["small"]), **keys}
             for i, keys in enumerate(sources)]
    path = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=mix_data["text"],
                        out=tmp_path / "run", data_keys={"train": train, **more})
    result = run_cli("train", path, env=NO_DEBUG)
    assert_one_error_line(result, expected)
    assert not (tmp_path / "run").exists()
