"""`peftune compare`: one recipe, several methods, a table of what each run measured."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import main_in_process, run_cli, write_recipe

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
    report = run_compare(recipe_path=recipe, methods="lora,full", method_overrides=["lora.r=2"])

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


def test_a_method_that_fails_is_a_row_and_the_others_still_train(tmp_path, tiny_model_dir,
                                                                  text_data):
    recipe = _recipe(tmp_path, tiny_model_dir, text_data)
    out = tmp_path / "cmp"
    result = run_cli("compare", str(recipe), "--methods", "full,lora", "--set",
                     "full.train.lr=1e30", "--out", str(out), "--quiet", timeout=600)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
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
