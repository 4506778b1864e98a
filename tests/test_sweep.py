"""`peftune sweep`: every combination of a grid of recipe values, one table sorted by loss."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import main_in_process, pref_recipe, write_recipe

from peftune.compare import exit_code, run_sweep
from peftune.compare.grid import (
    load_sweep_runs,
    rank_runs,
    short_keys,
    split_values,
    train_command,
)
from peftune.compare.runner import SUMMARY_KEYS


def _recipe(tmp_path: Path, tiny_model_dir: Path, text_data: dict, **sections) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", model=tiny_model_dir, data=text_data["train"],
                        val=text_data["val"], out=tmp_path / "runs" / "run",
                        train={"max_steps": 6}, **sections)


def _tree(root: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(top, name), root)
                  for top, dirs, files in os.walk(root) for name in dirs + files)


def test_sweep_trains_the_grid_and_ranks_it_by_validation_loss(tmp_path, tiny_model_dir,
                                                               text_data, compare_in_this_process,
                                                               capsys):
    from peftune.adapters.specs import LoraConfig
    from peftune.recipe import estimate_parameters, load_recipe

    recipe = _recipe(tmp_path, tiny_model_dir, text_data)
    # lr 1e30 diverges: two failed runs, which must end last whatever the grid's order
    report = run_sweep(recipe_path=recipe, grids=["train.lr=1e30,2e-2", "adapter.r=2,4"],
                       overrides=["train.max_steps=3"])

    out = tmp_path / "runs" / "run-sweep"  # the default: output.dir + "-sweep"
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(report))
    assert report["axis"] == "grid" and report["steps"] == 3 and exit_code(report) == 1
    assert report["grid"] == {"train.lr": ["1e30", "2e-2"], "adapter.r": ["2", "4"]}
    names = [row["name"] for row in report["rows"]]
    assert sorted(names) == ["lr=1e30,r=2", "lr=1e30,r=4", "lr=2e-2,r=2", "lr=2e-2,r=4"]
    ok, failed = report["rows"][:2], report["rows"][2:]
    assert [row["status"] for row in ok] == ["ok", "ok"]
    assert [row["status"] for row in failed] == ["failed", "failed"]
    assert all("the loss became" in row["error"] for row in failed)
    assert ok[0]["final_val_loss"] < ok[1]["final_val_loss"]  # sorted, and not a tie
    assert {row["grid"]["train.lr"] for row in ok} == {"2e-2"}
    config = json.loads((tiny_model_dir / "config.json").read_text())
    for row in ok:
        run = out / row["name"]
        summary = json.loads((run / "summary.json").read_text())
        assert {key: row[key] for key in SUMMARY_KEYS} == {k: summary.get(k) for k in SUMMARY_KEYS}
        assert summary["steps"] == 3 and row["final_val_loss"] > 0
        saved = yaml.safe_load((run / "recipe.yaml").read_text())
        rank = int(row["grid"]["adapter.r"])
        assert (saved["train"]["lr"], saved["adapter"]["r"]) == (0.02, rank)
        assert row["trainable_params"] == estimate_parameters(config, LoraConfig(r=rank))[1]

    best = ok[0]
    assert report["ranked_by"] == "final_val_loss"
    assert report["best"]["name"] == best["name"]
    assert report["best"]["final_val_loss"] == best["final_val_loss"]
    command = (f"peftune train {recipe} train.max_steps=3 train.lr=2e-2 "
               f"adapter.r={best['grid']['adapter.r']}")
    assert report["best"]["command"] == command
    # the command trains the best run's recipe (but for its output.dir)
    again = load_recipe(recipe, shlex.split(command)[3:]).model_dump(mode="json")
    saved = yaml.safe_load((out / best["name"] / "recipe.yaml").read_text())
    assert {**again, "output": None} == {**saved, "output": None}

    lines = (out / "compare.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| train.lr |"))
    assert lines[header] == ("| train.lr | adapter.r | trainable | peak RSS | tokens/s | "
                             "train loss | val loss | train s | total s | status |")
    rows = lines[header + 2: header + 6]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| " + r["grid"]["train.lr"], r["grid"]["adapter.r"]] for r in report["rows"]]
    assert f"| {best['final_val_loss']:.4f} |" in rows[0]
    assert rows[3].startswith("| 1e30 | ") and "| - | - | - |" in rows[3]
    assert f"`{command}`" in (out / "compare.md").read_text()
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["compare.json", "compare.md", "compare.png", *names])

    printed = capsys.readouterr().out
    assert "sweep 4 runs (train.lr 1e30, 2e-2 x adapter.r 2, 4)" in printed
    assert "run 1/4: lr=1e30,r=2" in printed and "run 4/4: lr=2e-2,r=4" in printed
    assert f"best (lowest validation loss, {best['final_val_loss']:.4f}): {best['name']}" \
        in printed
    assert printed.rstrip().endswith(command)


# ---- bad input: one line each, exit 2, nothing written ----------------------------------

@pytest.mark.parametrize(("args", "expected"), [
    (["--grid", "train.lrr=1e-4,3e-4"],
     ["--grid 'train.lrr=1e-4,3e-4': train.lrr: unknown key (did you mean lr?)"]),
    (["--grid", "adapter.rr=4,8"],
     ["--grid 'adapter.rr=4,8': adapter.rr: unknown key for adapter method lora "
      "(did you mean r?)"]),
    (["--grid", "adapter.r=4,abc", "--grid", "train.lr=1e-4,-1"],
     ["--grid 'adapter.r=4,abc': adapter.r: expected an integer, got 'abc'",
      "--grid 'train.lr=1e-4,-1': train.lr: must be > 0, got -1"]),
    (["--grid", "train.lr", "--grid", "adapter.r=", "--grid", "adapter.alpha=8,,16",
      "--grid", "train.warmup_ratio=0.1,0.2,0.1"],
     ["--grid 'train.lr': expected KEY=V1,V2,..., such as train.lr=1e-4,3e-4",
      "--grid 'adapter.r=': no values after '='; list them separated by commas, such as "
      "adapter.r=V1,V2",
      "--grid 'adapter.alpha=8,,16': an empty value in '8,,16'; separate the values with "
      "single commas",
      "--grid 'train.warmup_ratio=0.1,0.2,0.1': 0.1 is listed 2 times; list each value once"]),
    (["--grid", "train.lr=3e-4,0.0003"],
     ["--grid 'train.lr=3e-4,0.0003': 3e-4 and 0.0003 give the same recipe; list each value "
      "once"]),
    (["--grid", "adapter.r=2,4", "--grid", "adapter.r=8"],
     ["--grid adapter.r: given twice ('adapter.r=2,4' and 'adapter.r=8'); list all its values "
      "in one --grid"]),
    (["--grid", "train.lr=1e-4,2e-4", "train.lr=1e-3"],
     ["--grid 'train.lr=1e-4,2e-4': train.lr: also set by the override 'train.lr=1e-3'; keep "
      "the grid or the override"]),
    (["--grid", "train.seed=0,1", "--grid", "data.max_length=32,64"],
     ["--grid 'train.seed=0,1': train.seed: the same for every run of a sweep (a difference "
      "between seeds is noise, not the effect of a setting); to change it for all runs, pass "
      "it as an override, train.seed=0",
      "--grid 'data.max_length=32,64': data.max_length: the same for every run of a sweep "
      "(data: every run's loss must be measured on the same rows and tokens); to change it "
      "for all runs, pass it as an override, data.max_length=32"]),
    (["--grid", "output.dir=a,b"],
     ["--grid 'output.dir=a,b': output.dir: each run writes into OUT/<run name>; --out DIR "
      "names the sweep's directory"]),
    (["--grid", "adapter.method=lora,dora"],
     ["--grid 'adapter.method=lora,dora': adapter.method: a sweep tunes one method's settings "
      "(methods drop each other's keys); compare methods with peftune compare RECIPE "
      "--methods lora,dora"]),
    (["--grid", "train.lr=1e-4,2e-4", "--grid", "train.objective.name=dpo,simpo"],
     ["--grid 'train.objective.name=dpo,simpo': train.objective.name: a sweep keeps the "
      "recipe's objective (each objective's loss is its own quantity, so the runs would not "
      "sort by it); compare objectives with peftune compare RECIPE --objectives dpo,simpo"]),
    (["--grid", "train.lr=" + ",".join(f"{i}e-4" for i in range(1, 18))],
     ["--grid: 17 runs, more than --max-runs 16; list fewer values, or pass --max-runs 17 to "
      "train them all"]),
    (["--grid", "train.lr=1e-4,2e-4,3e-4", "--grid", "adapter.r=2,4", "--max-runs", "5",
      "--grid", "train.lrr=1"],
     ["--grid: 3 x 2 x 1 = 6 runs, more than --max-runs 5; list fewer values, or pass "
      "--max-runs 6 to train them all",
      "--grid 'train.lrr=1': train.lrr: unknown key (did you mean lr?)"]),
    ([], ["--grid: no grid given; name a recipe key and the values to try, such as "
          "--grid train.lr=1e-4,3e-4"]),
    (["--grid", "train.lr=1e-4,2e-4", "--out", "{notes}"],
     ["--out: {notes} is not empty; pass --overwrite to replace an earlier comparison, or "
      "choose another --out"]),
], ids=["unknown-key", "unknown-adapter-key", "bad-values", "malformed", "same-value",
        "key-twice", "key-also-overridden", "shared-keys", "output", "method", "objective",
        "max-runs-default", "max-runs-and-more", "no-grid", "out-not-empty"])
def test_bad_input_exits_2_with_every_problem_before_anything_trains(
        tmp_path, tiny_model_dir, text_data, monkeypatch, capsys, args, expected):
    recipe = _recipe(tmp_path, tiny_model_dir, text_data)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    monkeypatch.delenv("PEFTUNE_DEBUG", raising=False)
    before = _tree(tmp_path)
    args = [arg.format(notes=notes) for arg in args]
    out = [] if "--out" in args else ["--out", tmp_path / "sweep"]
    code, stdout, stderr = main_in_process(capsys, "sweep", recipe, *args, *out, "--quiet")
    assert code == 2, stderr
    assert stderr.splitlines() == [f"error: {line.format(notes=notes)}" for line in expected]
    assert stdout == "" and _tree(tmp_path) == before


def test_a_problem_of_some_combinations_names_the_values_they_share(tmp_path, tiny_model_dir,
                                                                    text_data):
    """Each value is valid alone; AdaLoRA refuses target_r above init_r, which only the
    combination init_r=6, target_r=8 has: reported once, prefixed with those values."""
    from peftune.errors import InputError

    recipe = _recipe(tmp_path, tiny_model_dir, text_data,
                     adapter={"method": "adalora", "init_r": 12, "target_r": 4})
    with pytest.raises(InputError) as err:
        load_sweep_runs(recipe, grids=["adapter.init_r=12,6", "adapter.target_r=4,8"])
    (line,) = err.value.lines
    assert line.startswith("init_r=6,target_r=8: "), line
    assert "adapter.target_r (8) must not exceed adapter.init_r (6)" in line


def test_grid_values_runs_and_names(tmp_path, tiny_model_dir, pair_data):
    recipe = pref_recipe(tmp_path, tiny_model_dir, pair_data["train"], {"name": "dpo",
                                                                        "beta": 0.1})
    grids, runs = load_sweep_runs(recipe, grids=["adapter.dropout=0.0, 0.1",
                                                 "train.objective.beta=0.1,0.2",
                                                 "adapter.target_modules=[q_proj,v_proj],"
                                                 "all-linear"])
    assert [grid.values for grid in grids] == [("0.0", "0.1"), ("0.1", "0.2"),
                                               ("[q_proj,v_proj]", "all-linear")]
    # the first grid varies slowest; a list value's name keeps only safe characters
    assert [run.name for run in runs[:3]] == [
        "dropout=0.0,beta=0.1,target_modules=q_proj-v_proj",
        "dropout=0.0,beta=0.1,target_modules=all-linear",
        "dropout=0.0,beta=0.2,target_modules=q_proj-v_proj"]
    assert len(runs) == 8 and len({run.name for run in runs}) == 8
    last = runs[-1].recipe
    assert (last.adapter.dropout, last.train.objective.beta) == (0.1, 0.2)
    assert last.adapter.target_modules == "all-linear"
    assert runs[0].recipe.adapter.target_modules == ["q_proj", "v_proj"]
    assert runs[-1].grid == {"adapter.dropout": "0.1", "train.objective.beta": "0.2",
                             "adapter.target_modules": "all-linear"}
    # two keys that end alike are named in full
    assert short_keys(["eval.batch_size", "train.lr", "x.batch_size"]) == {
        "eval.batch_size": "eval.batch_size", "train.lr": "lr", "x.batch_size": "x.batch_size"}
    assert split_values("a, 'b,c', {x: 1, y: 2}") == ["a", "'b,c'", "{x: 1, y: 2}"]


def test_rank_runs_sorts_failed_and_unmeasured_last_and_falls_back_to_train_loss():
    def row(name, status, loss, val):
        return {"name": name, "grid": {"train.lr": name}, "status": status, "final_loss": loss,
                "final_val_loss": val}

    report = {"recipe": "my recipe.yaml", "overrides": ["adapter.target_modules=[q_proj]"],
              "rows": [row("a", "failed", None, None), row("b", "ok", 2.0, None),
                       row("c", "ok", 3.0, 1.5), row("d", "ok", 1.0, 1.2)]}
    rank_runs(report)
    assert [r["name"] for r in report["rows"]] == ["d", "c", "b", "a"]
    assert report["ranked_by"] == "final_val_loss" and report["best"]["name"] == "d"
    assert report["best"]["command"] == ("peftune train 'my recipe.yaml' "
                                         "'adapter.target_modules=[q_proj]' train.lr=d")
    report["rows"] = [row("a", "failed", None, None), row("b", "ok", 2.0, None),
                      row("c", "ok", 1.5, None)]
    rank_runs(report)  # no validation data: by train loss
    assert [r["name"] for r in report["rows"]] == ["c", "b", "a"]
    assert (report["ranked_by"], report["best"]["final_loss"]) == ("final_loss", 1.5)
    report["rows"] = [row("a", "failed", None, None)]
    rank_runs(report)
    assert report["best"] is None
    assert train_command("r.yaml", [], {"train.lr": "3e-4"}) == "peftune train r.yaml train.lr=3e-4"
