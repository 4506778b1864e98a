"""`peftune select-data` from the command line and from recipes, bad input, and
`data.select` in a training recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import cli_in_process, make_text_rows, read_jsonl, write_jsonl, write_recipe

WORDS_B = "river stone forest cloud rain wind snow leaf bird moss".split()


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """A pool of Greek-letter rows and nature rows; the target is Greek letters."""
    greek = make_text_rows(40, seed=0)
    nature = [{"text": " ".join(WORDS_B[(i + j) % len(WORDS_B)] for j in range(3 + i % 9))}
              for i in range(40)]
    pool = [{**row, "label": "greek"} for row in greek] + \
        [{**row, "label": "nature"} for row in nature]
    return {"pool": write_jsonl(tmp_path / "pool.jsonl", pool),
            "target": write_jsonl(tmp_path / "target.jsonl", make_text_rows(20, seed=5)),
            "out": tmp_path / "sel"}


def _base(files, *extra: str) -> list[str]:
    return ["select-data", "--method", "dsir", "--pool", files["pool"], "--target",
            files["target"], "--k", "20", "--out", files["out"], *extra]


def test_cli_selects_and_prints_a_table(files):
    result = cli_in_process(*_base(files, "--label-field", "label", "--sampling", "top_k"))
    assert result.returncode == 0, result.stderr
    assert "KL reduction" in result.stdout and "greek 20" in result.stdout
    assert "than random rows of the same size" in result.stdout
    report = json.loads((files["out"] / "report.json").read_text())
    assert report["labels"]["selected"] == {"greek": 20}


def test_recipe_block_flags_and_overrides(files, tmp_path):
    recipe = tmp_path / "select.yaml"
    recipe.write_text(yaml.safe_dump({"select": {
        "method": "zipfit", "pool": [str(files["pool"])], "target": [str(files["target"])],
        "k": 10, "out": str(tmp_path / "from-recipe"), "label_field": "label"}}))
    assert cli_in_process("select-data", recipe, "--quiet").returncode == 0
    # A flag and an override win over the recipe.
    result = cli_in_process("select-data", recipe, "select.k=5", "--out", tmp_path / "flags", "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "flags" / "report.json").read_text())["k"] == 5


BAD = [
    (["--pool", "missing.jsonl"], "select.pool: no such file or directory: missing.jsonl"),
    (["--target", "missing.jsonl"], "select.target: no such file or directory"),
    (["--k", "0"], "--k: select.k: must be > 0, got 0"),
    (["--k", "1000"], "k=1000 is larger than the pool, which has 80 rows"),
    (["--method", "dsirr"], "select.method: must be one of dsir, zipfit; got 'dsirr' "
                            "(did you mean dsir?)"),
    (["--method", "zipfit", "--level", "0"], "level 0 makes gzip store the text without "
                                             "compressing it"),
    (["--compressor", "lz4"], "select.compressor: only method zipfit has this key"),
    (["--text-field", "body"], "target.jsonl:1: missing field; the row has: "
                               "text (field 'body')"),
]


@pytest.mark.parametrize(("flags", "message"), BAD, ids=[b[1][:30] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(files, tmp_path, flags, message):
    options = {"--method": "dsir", "--pool": files["pool"], "--target": files["target"],
               "--k": "20", "--out": files["out"]}
    options.update(zip(flags[::2], flags[1::2], strict=True))
    result = cli_in_process("select-data", *[x for pair in options.items() for x in pair], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert "Traceback" not in result.stderr
    assert not files["out"].exists()
    assert not list(tmp_path.glob(".sel.tmp-*"))


def test_bad_rows_and_files(files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    result = cli_in_process(*_base({**files, "pool": bad}))
    assert result.returncode == 2
    assert "bad.jsonl:2: the line is not valid UTF-8" in result.stderr
    write_jsonl(tmp_path / "holes.jsonl", [{"text": "a b"}, {"text": "c"}, {"body": "d"}])
    result = cli_in_process(*_base({**files, "pool": "holes.jsonl"}, "--k", "1"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: select.pool: holes.jsonl:3: missing field; the row "
                                     "has: body (field 'text')")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = cli_in_process(*_base({**files, "target": empty}))
    assert result.returncode == 2 and "empty.jsonl has no rows" in result.stderr
    result = cli_in_process("select-data", "--method", "dsir", "--k", "3")
    assert result.returncode == 2
    assert "select.pool: required: give --pool" in result.stderr
    assert not files["out"].exists()


def test_output_dir_needs_overwrite(files):
    files["out"].mkdir()
    (files["out"] / "keep.txt").write_text("mine")
    result = cli_in_process(*_base(files))
    assert result.returncode == 2 and "is not empty; pass --overwrite" in result.stderr
    result = cli_in_process(*_base(files, "--overwrite"))
    assert result.returncode == 2 and "not a selection output" in result.stderr
    assert (files["out"] / "keep.txt").read_text() == "mine"
    (files["out"] / "keep.txt").unlink()
    assert cli_in_process(*_base(files, "--quiet")).returncode == 0
    assert cli_in_process(*_base(files, "--quiet")).returncode == 2
    assert cli_in_process(*_base(files, "--quiet", "--overwrite")).returncode == 0


def _training_recipe(path: Path, model: Path, files: dict, select: dict) -> Path:
    recipe = write_recipe(path, model=model, data=files["pool"], out=path.parent / "run",
                          train={"max_steps": 2})
    values = yaml.safe_load(recipe.read_text())
    values["data"]["select"] = select
    recipe.write_text(yaml.safe_dump(values, sort_keys=False))
    return recipe


def test_training_recipe_selects_first_and_caches(files, tiny_model_dir, tmp_path):
    recipe = _training_recipe(tmp_path / "r.yaml", tiny_model_dir, files, {
        "method": "dsir", "target": [str(files["target"])], "k": 30, "sampling": "top_k"})
    first = cli_in_process("train", recipe)
    assert first.returncode == 0, first.stderr
    assert "data.select: dsir chose 30 of 80 rows" in first.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    selection = summary["data"]["selection"]
    assert selection["k"] == 30 and selection["cached"] is False
    selected = Path(selection["dir"]) / "selected.jsonl"
    assert all(json.loads(line)["label"] == "greek" for line in selected.read_text().splitlines())
    # the run keeps the rows it trained on, and the selection's report
    kept = tmp_path / "run" / "selection"
    assert (kept / "selected.jsonl").read_text() == selected.read_text()
    assert json.loads((kept / "report.json").read_text())["k"] == 30
    second = cli_in_process("train", recipe, "--overwrite")
    assert second.returncode == 0, second.stderr
    assert "(cached, KL reduction" in second.stdout


def test_training_recipe_rejects_bad_select_keys(files, tiny_model_dir, tmp_path):
    recipe = _training_recipe(tmp_path / "r.yaml", tiny_model_dir, files, {
        "method": "dsir", "target": [str(files["target"])], "k": 30, "pool": ["x.jsonl"],
        "compresor": "lz4"})
    result = cli_in_process("validate", recipe)
    assert result.returncode == 2
    assert "data.select.pool: the pool of data.select is data.train" in result.stderr
    assert "data.select.compresor: unknown key (did you mean compressor?)" in result.stderr


def test_more_bad_input_is_one_line(files, tmp_path):
    recipe = tmp_path / "s.yaml"
    recipe.write_text("select: 5\n")
    result = cli_in_process("select-data", recipe, "--k", "3")
    assert result.returncode == 2 and "select: expected a mapping" in result.stderr
    result = cli_in_process(*_base(files, "--seed", "-1"))
    assert result.returncode == 2 and "--seed: select.seed: must be >= 0" in result.stderr
    result = cli_in_process(*_base({**files, "out": "/proc/peftune-no/out"}))
    assert result.returncode == 2 and "cannot write beside" in result.stderr
    nested = tmp_path / "new1" / "new2" / "out"
    result = cli_in_process(*_base({**files, "out": nested}, "--k", "5000"))
    assert result.returncode == 2 and not (tmp_path / "new1").exists()
    empty_target = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "   "}])
    result = cli_in_process(*_base({**files, "target": empty_target}))
    assert result.returncode == 2 and "blank.jsonl has only empty texts" in result.stderr
    result = cli_in_process(*_base(files, "--quiet"))
    assert result.returncode == 0
    result = cli_in_process(*_base({**files, "out": "."}, "--overwrite"), cwd=files["out"])
    assert result.returncode == 2 and "is the current directory" in result.stderr
    assert (files["out"] / "selected.jsonl").is_file()


def test_empty_and_bad_rows_are_never_selected(tmp_path, files):
    rows = read_jsonl(files["pool"])
    rows += [{"text": ""}, {"text": "   "}, {"text": "caf\ud800 latin"}, {"body": "no text"}]
    pool = write_jsonl(tmp_path / "holes.jsonl", rows)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + files["pool"].read_bytes())
    result = cli_in_process(*_base({**files, "pool": pool}, "select.on_bad_row=skip", "--k", "80",
                            "--sampling", "top_k", "--pool", bom, "--quiet"))
    assert result.returncode == 0, result.stderr
    report = json.loads((files["out"] / "report.json").read_text())
    assert report["skipped_rows"] == 1 and report["eligible"] == 2 * 80 + 1
    written = (files["out"] / "selected.jsonl").read_bytes().splitlines()
    assert all(json.loads(line).get("text", "").strip() for line in written)
    assert not any(line.startswith(b"\xef\xbb\xbf") for line in written)


def test_zero_target_weight_gets_no_rows():
    from peftune.select.dsir import split_k

    assert split_k(3, [1, 1, 0]) == [1, 2, 0]
    assert split_k(10, [1, 0, 1]) == [5, 0, 5]
