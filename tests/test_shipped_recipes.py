"""Every recipe shipped under recipes/ is found (recursively, and counted) and validates.

A recipe that stops validating, or one that is added or removed without updating SHIPPED,
fails here (STYLE 8: torchtune's check listed one directory and validated 3 of 197 files).
Model paths need not exist: validation never loads a model. An eval file (only an `eval:`
section, for `peftune eval --config`) is validated as one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO

from peftune.evaluate.config import load_eval_config
from peftune.recipe import load_recipe

RECIPES = REPO / "recipes"
# quickstart: lora, qlora, eora (+ eval.yaml); tiny: pretrain, lora;
# models: qwen2.5-0.5b lora + qlora, llama-3.2-1b qlora; preference: dpo (+ eval.yaml)
SHIPPED = 11
ALL = sorted(RECIPES.rglob("*.yaml"))
EVAL_FILES = [p for p in ALL if set(yaml.safe_load(p.read_text()) or {}) == {"eval"}]
TRAIN_RECIPES = [p for p in ALL if p not in EVAL_FILES]
CORPUS_FILES = {"pretrain.jsonl", "tests_train.jsonl", "tests_val.jsonl", "instruct_train.jsonl"}
TASK_FILES = {"train.jsonl", "heldout.jsonl"}  # scripts/build_demo_task.py


def _name(path: Path) -> str:
    return path.relative_to(RECIPES).as_posix()


def _load(path: Path, overrides: tuple[str, ...] = ()):
    return load_recipe(path, list(overrides))


def test_every_shipped_recipe_is_found():
    assert len(ALL) == SHIPPED, (
        f"found {len(ALL)} recipes under recipes/, expected {SHIPPED}: {[_name(p) for p in ALL]} "
        "(update SHIPPED when adding or removing a recipe)")
    stray = [p for p in RECIPES.rglob("*.yml")]
    assert not stray, f"use the .yaml extension (the tests look for *.yaml): {stray}"


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=_name)
def test_shipped_recipe_validates(path: Path):
    recipe = _load(path)
    assert recipe.output.dir


@pytest.mark.parametrize("path", EVAL_FILES, ids=_name)
def test_shipped_eval_file_validates(path: Path):
    assert load_eval_config(path).tasks


@pytest.mark.parametrize("path", ALL, ids=_name)
def test_shipped_recipe_header_shows_its_own_command(path: Path):
    # STYLE 7: the header says what the recipe does and the exact command that runs it.
    lines = path.read_text().splitlines()
    assert lines and lines[0].startswith("#"), f"{_name(path)}: begins without a header comment"
    header = "\n".join(line for line in lines[:_first_key_line(lines)])
    verb = "eval" if path in EVAL_FILES else "train"
    command = (f"--config recipes/{_name(path)}" if verb == "eval"
               else f"peftune train recipes/{_name(path)}")
    assert command in header, f"{_name(path)}: the header does not show `{command}`"


def _first_key_line(lines: list[str]) -> int:
    return next((i for i, line in enumerate(lines) if line and not line.startswith("#")), len(lines))


def test_quickstart_recipes_fine_tune_the_real_model_on_the_demo_task():
    """The demo's paths line up: task files the builder writes, lora -> qlora -> eval."""
    lora = _load(RECIPES / "quickstart/lora.yaml")
    qlora = _load(RECIPES / "quickstart/qlora.yaml")
    evaluation = load_eval_config(RECIPES / "quickstart/eval.yaml")
    for recipe in (lora, qlora):
        assert recipe.model.path == "smollm2-135m-instruct"  # the catalogue model
        for data_file in (recipe.data.train, recipe.data.val):
            assert Path(data_file).parent == Path("runs/demo/data")
            assert Path(data_file).name in TASK_FILES
        assert recipe.data.format == "chat"
    assert lora.train.eval_every and lora.data.val
    # eval.yaml asks the held-out questions that lora.yaml validates on.
    assert {task.data for task in evaluation.tasks} == {lora.data.val}
    assert {task.task for task in evaluation.tasks} == {"generate", "perplexity"}
    assert all(task.format == "chat" for task in evaluation.tasks)
    # qlora.yaml changes only the quantization and the output directory.
    assert qlora.quant.method == "nf4" and qlora.quant.compute_dtype == "float32"
    assert qlora.adapter.model_dump() == lora.adapter.model_dump()
    assert qlora.data == lora.data and qlora.train == lora.train
    assert lora.output.dir != qlora.output.dir


def test_tiny_recipes_chain_together():
    """The offline pipeline's paths line up: corpus files the builder writes, pretrain -> lora."""
    pretrain = _load(RECIPES / "tiny/pretrain.yaml")
    lora = _load(RECIPES / "tiny/lora.yaml")
    for recipe in (pretrain, lora):
        for data_file in filter(None, (recipe.data.train, recipe.data.val)):
            assert Path(data_file).parent == Path("runs/tiny/data")
            assert Path(data_file).name in CORPUS_FILES
    assert pretrain.adapter.method == "full"
    assert Path(lora.model.path) == Path(pretrain.output.dir) / "model"
    assert lora.train.eval_every and lora.data.val
    assert pretrain.output.dir != lora.output.dir


def test_model_recipes_point_at_the_documented_user_file():
    for path in sorted((RECIPES / "models").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        assert raw["data"]["train"] == "data/train.jsonl", _name(path)
        lines = path.read_text().splitlines()
        assert "data/train.jsonl" in "\n".join(lines[:_first_key_line(lines)]), (
            f"{_name(path)}: the header does not document data/train.jsonl")


def test_overrides_apply_to_shipped_recipes():
    recipe = _load(RECIPES / "quickstart/lora.yaml", ("adapter.r=32", "train.max_steps=7"))
    assert recipe.adapter.r == 32 and recipe.train.max_steps == 7
