"""`peftune compare`: one recipe, several methods, a table of what each run measured."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import main_in_process, pref_recipe, run_cli, write_recipe

from peftune.compare import run_compare
from peftune.compare.runner import SUMMARY_KEYS, check_compare_dir
from peftune.errors import InputError


def _recipe(tmp_path: Path, tiny_model_dir: Path, text_data: dict, **sections) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", model=tiny_model_dir, data=text_data["train"],
                        val=text_data["val"], out=tmp_path / "runs" / "run",
                        train={"max_steps": 4}, **sections)


def test_compare_tabulates_what_each_run_measured(tmp_path, tiny_model_dir, text_data, capsys):
    from peftune.adapters.specs import LoraConfig
    from peftune.recipe import estimate_parameters

    recipe = _recipe(tmp_path, tiny_model_dir, text_data)
    report = run_compare(recipe_path=recipe, methods="lora,full", run_overrides=["lora.r=2"])

    out = tmp_path / "runs" / "run-compare"  # the default: output.dir + "-compare"
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(report))
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["lora", "full"]
    for method, row in rows.items():
        summary = json.loads((out / method / "summary.json").read_text())
        assert row["status"] == "ok" and summary["method"] == method and summary["steps"] == 4
        assert {key: row[key] for key in SUMMARY_KEYS} == {k: summary.get(k) for k in SUMMARY_KEYS}
        assert row["final_loss"] > 0 and row["final_val_loss"] > 0 and row["peak_rss_bytes"] > 0
    config = json.loads((tiny_model_dir / "config.json").read_text())
    total, lora_r2 = estimate_parameters(config, LoraConfig(r=2))  # the --set rank, not the r: 4
    assert rows["lora"]["trainable_params"] == lora_r2
    assert rows["full"]["trainable_params"] == total > lora_r2
    assert rows["full"]["dropped_keys"] == ["adapter.r", "adapter.alpha"]
    assert rows["lora"]["dropped_keys"] == [] and rows["lora"]["overrides"] == ["lora.r=2"]

    markdown = (out / "compare.md").read_text()
    assert f"| lora | {lora_r2:,} |" in markdown and f"| full | {total:,} |" in markdown
    assert "full: dropped adapter.r, adapter.alpha" in markdown
    png = (out / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    printed = capsys.readouterr().out
    assert "method 1/2: lora" in printed and "method 2/2: full" in printed
    assert "full: dropped adapter.r, adapter.alpha" in printed
    assert f"{rows['full']['final_val_loss']:.4f}" in printed  # the table


def test_a_method_that_fails_is_a_row_and_the_others_still_train(
        tmp_path, tiny_model_dir, text_data, compare_in_this_process, monkeypatch, capsys):
    recipe = _recipe(tmp_path, tiny_model_dir, text_data)
    out = tmp_path / "cmp"
    monkeypatch.delenv("PEFTUNE_DEBUG", raising=False)
    code, stdout, stderr = main_in_process(capsys, "compare", recipe, "--methods", "full,lora",
                                           "--set", "full.train.lr=1e30", "--out", out, "--quiet")
    assert code == 1, stderr
    assert "Traceback" not in stderr and stdout == ""
    rows = {row["method"]: row for row in json.loads((out / "compare.json").read_text())["rows"]}
    assert rows["full"]["status"] == "failed" and rows["full"]["error_kind"] == "training"
    assert "the loss became" in rows["full"]["error"] and rows["full"]["final_loss"] is None
    assert rows["lora"]["status"] == "ok" and rows["lora"]["final_loss"] is not None
    full_line = next(line for line in (out / "compare.md").read_text().splitlines()
                     if line.startswith("| full |"))
    assert full_line.startswith("| full | - | - | - | - | - | - |")
    assert full_line.endswith(f"| failed: {rows['full']['error']} |")


def _non_empty(path: Path, *, compare: bool) -> Path:
    path.mkdir()
    (path / ("compare.json" if compare else "notes.txt")).write_text("{}")
    return path


@pytest.mark.parametrize(("args", "expected"), [
    (["--methods", "lora,nope"], "--methods: unknown method 'nope'; choose from: {choices}"),
    (["--methods", ""], "--methods: no method given"),
    (["--methods", "lora,full,lora"], "--methods: lora is named 2 times"),
    (["--methods", "full", "--set", "lora.r=2"],
     "--set 'lora.r=2': lora is not one of --methods (full)"),
    (["--methods", "lora,full", "--set", "lora.rr=2"],
     "--set 'lora.rr=2': adapter.rr: unknown key for adapter method lora (did you mean r?)"),
    (["--methods", "lora,full", "--set", "full.train.max_steps=2"],
     "train.max_steps: the same for every method in a comparison"),
    (["--methods", "lora,full", "quant.method=nf4"],
     "quant.method: nf4 cannot be combined with adapter.method: full"),
    (["--methods", "lora,full", "--out", "{notes}"], "is not empty; pass --overwrite"),
    (["--methods", "lora,full", "--out", "{notes}", "--overwrite"],
     "is not a peftune compare directory (no compare.json); refusing to delete it"),
    (["--methods", "lora,full", "--out", "{earlier}"], "is not empty; pass --overwrite"),
])
def test_bad_input_exits_2_with_one_line_before_anything_trains(tmp_path, tiny_model_dir,
                                                                text_data, args, expected):
    from peftune.adapters.registry import method_names

    recipe = _recipe(tmp_path, tiny_model_dir, text_data)
    dirs = {"notes": _non_empty(tmp_path / "notes", compare=False),
            "earlier": _non_empty(tmp_path / "earlier", compare=True)}
    args = [arg.format(**dirs) for arg in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "cmp")]
    result = run_cli("compare", str(recipe), *args, *out, timeout=600)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expected.format(choices=", ".join(method_names())) in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "notes", "recipe.yaml"]
    assert [p.name for p in dirs["notes"].iterdir()] == ["notes.txt"]
    assert [p.name for p in dirs["earlier"].iterdir()] == ["compare.json"]


def test_overwrite_accepts_only_an_earlier_comparison(tmp_path):
    check_compare_dir(_non_empty(tmp_path / "earlier", compare=True), overwrite=True)
    check_compare_dir(tmp_path / "new", overwrite=False)
    with pytest.raises(InputError, match="not a peftune compare directory"):
        check_compare_dir(_non_empty(tmp_path / "other", compare=False), overwrite=True)


def _tree(root: Path) -> list[str]:
    """Every path below `root`, links included and not followed."""
    return sorted(os.path.relpath(os.path.join(top, name), root)
                  for top, dirs, files in os.walk(root) for name in dirs + files)


@pytest.mark.parametrize(("args", "expected"), [
    (["--out", "loop"], "--out: loop is a symbolic link loop"),
    ([], "--out (default: output.dir + -compare): {tmp}/runs/run-compare is a symbolic link loop"),
    (["--out", "dangling"], "--out: dangling is a broken symbolic link"),
    (["--out", "recipe.yaml"], "--out: recipe.yaml exists and is not a directory"),
    (["--out", "recipe.yaml/cmp"], "--out: cannot create recipe.yaml/cmp (Not a directory)"),
    (["--out", "sub/../.."], "--out: sub/../.. resolves to {parent}, above the current directory"),
    (["--out", "home"], "--out: home is the home directory"),
    (["--out", "to-notes", "--overwrite"],
     "--overwrite: to-notes is not a peftune compare directory (no compare.json)"),
], ids=["symlink-loop", "default-out-loop", "broken-link", "a-file", "under-a-file", "traversal",
        "home", "link-to-non-comparison"])
def test_the_output_directory_policy_of_train_applies_to_out(tmp_path, tiny_model_dir, text_data,
                                                             monkeypatch, capsys, args, expected):
    """recipe.guards.output_dir_problem (train's policy) for --out: exit 2, one line naming
    --out and the fix, no traceback, nothing created, deleted or followed."""
    recipe = _recipe(tmp_path, tiny_model_dir, text_data)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "run-compare").symlink_to("run-compare")
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "dangling").symlink_to("nowhere")
    (tmp_path / "home").mkdir()
    (tmp_path / "to-notes").symlink_to(_non_empty(tmp_path / "notes", compare=False))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PEFTUNE_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    code, _, stderr = main_in_process(capsys, "compare", recipe.name, "--methods", "lora,full",
                                      "--quiet", *args)
    assert code == 2, stderr
    (line,) = stderr.splitlines()
    assert line.startswith("error: " + expected.format(tmp=tmp_path,
                                                       parent=tmp_path.resolve().parent)), line
    assert "name a new directory" in line or "choose another --out" in line.lower(), line
    assert _tree(tmp_path) == before


def test_overwrite_through_a_link_replaces_the_earlier_comparison_it_points_to(tmp_path):
    from peftune.compare.runner import make_compare_dir

    earlier = _non_empty(tmp_path / "earlier", compare=True)
    (earlier / "lora").mkdir()
    link = tmp_path / "latest"
    link.symlink_to(earlier)
    with pytest.raises(InputError, match="latest is not empty; pass --overwrite"):
        check_compare_dir(link, overwrite=False)
    check_compare_dir(link, overwrite=True)
    make_compare_dir(link)
    assert link.is_symlink() and link.resolve() == earlier.resolve()
    assert list(earlier.iterdir()) == []


# ---- --objectives: one run per training objective ---------------------------------------

def _pref_recipe(tmp_path: Path, model: Path, pair_data: dict, objective: object = "dpo",
                 fmt: str = "preference") -> Path:
    data = pair_data["train" if fmt == "preference" else "kto"]
    return pref_recipe(tmp_path, model, data, objective, fmt=fmt,
                       val=pair_data["val"] if fmt == "preference" else None,
                       train={"max_steps": 2, "eval_every": 2})


@pytest.mark.slow  # the same training path as the methods comparison above (default run)
def test_compare_objectives_trains_one_run_per_objective(tmp_path, tiny_model_dir, pair_data,
                                                         capsys):
    import yaml

    recipe = _pref_recipe(tmp_path, tiny_model_dir, pair_data, {"name": "dpo", "beta": 0.2})
    report = run_compare(recipe_path=recipe, objectives="dpo,simpo",
                         run_overrides=["simpo.gamma=1.0"], out=tmp_path / "cmp")

    out = tmp_path / "cmp"
    assert report["axis"] == "objective" and report["methods"] == ["lora"]
    rows = {row["objective"]: row for row in report["rows"]}
    assert list(rows) == ["dpo", "simpo"]
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "compare.png",
                                                     "dpo", "simpo"]
    for name, row in rows.items():
        summary = json.loads((out / name / "summary.json").read_text())
        assert row["status"] == "ok" and summary["objective"]["name"] == name
        assert row["method"] == "lora" and summary["steps"] == 2
        assert 0 <= row["val_reward_accuracy"] <= 1 and row["val_reward_margin"] is not None
        assert row["val_reward_accuracy"] == summary["objective"]["val_reward_accuracy"]
    # the recipe's beta stays with dpo; simpo takes its own default and the --set gamma
    assert rows["dpo"]["objective_keys"]["beta"] == 0.2
    saved = yaml.safe_load((out / "simpo" / "recipe.yaml").read_text())
    assert saved["train"]["objective"] == {"name": "simpo", "beta": 2.0, "gamma": 1.0}
    assert rows["simpo"]["defaulted_keys"] == ["train.objective.beta"]
    assert rows["simpo"]["dropped_keys"] == []  # only keys the recipe wrote can be dropped

    markdown = (out / "compare.md").read_text()
    assert "| objective | peak RSS | tokens/s | train loss | val loss | val reward acc | " \
           "val reward margin | train s | total s | status |" in markdown
    accuracy = f"{rows['simpo']['val_reward_accuracy']:.1%}"
    assert next(line for line in markdown.splitlines()
                if line.startswith("| simpo |")).count(accuracy) == 1
    assert "adapter method lora for every run" in markdown
    assert "simpo: beta is simpo's default, not the recipe's" in markdown
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert "objective 1/2: dpo" in printed and "objective 2/2: simpo" in printed


def test_one_method_with_several_objectives_and_the_recipe_keys_each_objective_keeps(
        tmp_path, tiny_model_dir, pair_data):
    """--methods with one name: every run's method; `dora.r` addresses them all. Objective
    keys carry where the objective reads them, beta only to the recipe's own objective."""
    from peftune.compare.plan import load_runs

    recipe = _pref_recipe(tmp_path, tiny_model_dir, pair_data,
                          {"name": "dpo", "beta": 0.2, "reference": "precomputed"})
    axis, runs = load_runs(recipe, methods="dora", objectives="dpo,ipo,orpo",
                           run_overrides=["dora.r=2", "ipo.beta=0.3", "orpo.lambda=0.2",
                                          "orpo.train.lr=1e-3"])
    assert axis == "objective" and [run.name for run in runs] == ["dpo", "ipo", "orpo"]
    objectives = {run.name: run.recipe.train.objective for run in runs}
    assert [run.recipe.adapter.method for run in runs] == ["dora"] * 3
    assert [run.recipe.adapter.r for run in runs] == [2, 2, 2]
    assert (objectives["dpo"].beta, objectives["dpo"].reference) == (0.2, "precomputed")
    assert (objectives["ipo"].beta, objectives["ipo"].reference) == (0.3, "precomputed")
    assert objectives["orpo"].lambda_ == 0.2 and runs[2].recipe.train.lr == 1e-3
    assert runs[0].recipe.train.lr == runs[1].recipe.train.lr == 2e-2
    assert runs[1].defaulted == []  # its beta came from --set
    assert runs[2].dropped == ["train.objective.beta", "train.objective.reference"]


def test_method_and_objective_names_never_overlap():
    """--set NAME.KEY tells a method from an objective by its name alone."""
    from peftune.adapters.registry import method_names
    from peftune.recipe.schema import OBJECTIVE_KEYS

    assert set(method_names()).isdisjoint(OBJECTIVE_KEYS)


@pytest.mark.parametrize(("recipe", "args", "expected"), [
    ("dpo", ["--objectives", "dpo,dpx"],
     "--objectives: unknown objective 'dpx'; choose from: sft, dpo, ln-dpo, ipo, orpo, simpo, "
     "kto (did you mean dpo?)"),
    ("dpo", ["--objectives", "dpo,kto"],
     "--objectives kto: train.objective: objective kto trains on unpaired rows (prompt, "
     "completion, label) and needs data.format: kto, got preference"),
    ("kto", ["--objectives", "kto,dpo"],
     "--objectives dpo: train.objective: objective dpo trains on chosen/rejected pairs and "
     "needs data.format: preference, got kto; use objective kto for unpaired rows"),
    ("dpo", ["--objectives", "sft,dpo"],
     "sft: {recipe}: ... data.format: preference is for preference objectives"),
    ("dpo", ["--objectives", "dpo,ipo", "--set", "simpo.gamma=1"],
     "--set 'simpo.gamma=1': simpo is not one of --objectives (dpo, ipo)"),
    ("dpo", ["--objectives", "dpo,simpo", "--set", "dpo.gamma=1"],
     "--set 'dpo.gamma=1': train.objective.gamma: objective dpo has no key 'gamma' (its keys: "
     "beta, label_smoothing, reference); only simpo reads it"),
    ("dpo", ["--objectives", "dpo,simpo", "--set", "simpo.gama=1"], "(did you mean gamma?)"),
    ("dpo", ["--objectives", "dpo,ipo", "--set", "ipo.beta=-1"],
     "--set 'ipo.beta=-1': train.objective.beta: must be > 0, got -1"),
    ("dpo", ["--objectives", "dpo,ipo", "--set", "ipo.train.max_steps=3"],
     "train.max_steps: the same for every objective in a comparison"),
    ("dpo", ["--objectives", "dpo,ipo", "train.objective.beta=0.3"],
     "override 'train.objective.beta=0.3': train.objective: set by --objectives"),
    ("dpo", ["--objectives", "dpo,ipo", "--methods", "lora,dora"],
     "--methods and --objectives: a comparison varies one of them; list several methods or "
     "several objectives, not both"),
    ("dpo", [], "--methods or --objectives: name what to compare"),
], ids=["unknown", "kto-on-pairs", "dpo-on-kto-rows", "sft-on-pairs", "set-not-compared",
        "key-of-another", "key-typo", "bad-value", "shared-key", "global-objective",
        "both-axes", "neither"])
def test_bad_objective_input_exits_2_with_one_line_before_anything_trains(
        tmp_path, tiny_model_dir, pair_data, monkeypatch, capsys, recipe, args, expected):
    fmt = "kto" if recipe == "kto" else "preference"
    path = _pref_recipe(tmp_path, tiny_model_dir, pair_data, recipe, fmt=fmt)
    monkeypatch.delenv("PEFTUNE_DEBUG", raising=False)
    before = _tree(tmp_path)
    code, _, stderr = main_in_process(capsys, "compare", path, *args, "--out", tmp_path / "cmp",
                                      "--quiet")
    assert code == 2, stderr
    (line,) = stderr.splitlines()
    assert line.startswith("error: "), line
    rest = line
    for part in (p.format(recipe=path) for p in expected.split(" ... ")):  # each, in order
        assert part in rest, line
        rest = rest.partition(part)[2]
    assert _tree(tmp_path) == before
