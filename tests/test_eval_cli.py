"""`peftune eval` from the command line: a trained run against its base, an eval YAML with
several tasks, two processes equal to one, a training recipe's eval: block, bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import (
    IMPORTTIME,
    NO_DEBUG,
    TORCHRUN_2,
    cli_in_process,
    imported_modules,
    main_in_process,
    run_cli,
    run_script,
    write_jsonl,
    write_recipe,
)

PAIRS = [{"prompt": "red?", "response": "apple"}, {"prompt": "yellow?", "response": "banana"},
         {"prompt": "green?", "response": "lime"}]
CHOICES = [{"prompt": "red?\n", "choices": ["apple", "banana"], "answer": 0},
           {"prompt": "yellow?\n", "choices": ["apple", "banana"], "answer": "banana"},
           {"prompt": "green?\n", "choices": ["grape", "lime", "kiwi"], "answer": 1}]


def _cli(*args, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`peftune ARGS` in this process (the two-process and import tests start their own)."""
    return cli_in_process(*args, cwd=cwd, env={**NO_DEBUG, **(env or {})})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, text_data):
    """A LoRA run on the text data (6 steps) and the small files the tasks read."""
    root = tmp_path_factory.mktemp("evalcli")
    recipe = write_recipe(root / "lora.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=root / "run", train={"max_steps": 12})
    done = _cli("train", recipe)
    assert done.returncode == 0, done.stderr
    files = {"pairs": write_jsonl(root / "pairs.jsonl", PAIRS),
             "mc": write_jsonl(root / "mc.jsonl", CHOICES)}
    config = root / "eval.yaml"
    config.write_text(yaml.safe_dump({"eval": {"batch_size": 2, "tasks": [
        {"task": "perplexity", "data": str(text_data["val"]), "window": 16, "stride": 8},
        {"task": "choice", "name": "colours", "data": str(files["mc"])},
        {"task": "generate", "data": str(files["pairs"]), "max_new_tokens": 4,
         "metrics": ["exact_match", "contains"]}]}}, sort_keys=False))
    return {"run": root / "run", "root": root, "config": config, **files}


def test_adapter_beats_its_base_on_the_training_language(lora_run, text_data, tmp_path):
    out = tmp_path / "out"
    result = _cli("eval", lora_run["run"], "--task", "perplexity", "--data", text_data["val"],
                  "--compare", "base", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "peftune eval" in result.stdout and "Δ base" in result.stdout
    assert "bits_per_byte" in result.stdout and "examples/s" not in result.stderr
    report = json.loads((out / "report.json").read_text())
    adapter, base = report["models"]
    assert adapter["adapter"].endswith("adapter") and adapter["method"] == "lora"
    assert base["adapter"] is None and base["model"] == adapter["model"]
    delta = report["deltas"]["run - base"]["perplexity"]
    assert delta["loss"] < 0 and delta["perplexity"] < 0  # training lowered the loss
    loss = adapter["tasks"]["perplexity"]["metrics"]["loss"]
    assert loss["n"] == 12 and report["timings"]["total_seconds"] > 0
    assert (out / "metrics.png").is_file()
    summary = json.loads((lora_run["run"] / "summary.json").read_text())
    assert loss["value"] < summary["final_loss"] + 0.5  # the same language, held out


def test_eval_yaml_with_several_tasks_and_the_default_out(lora_run):
    result = _cli("eval", lora_run["run"], "--config", lora_run["config"], "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((lora_run["run"] / "eval" / "report.json").read_text())
    assert list(report["models"][0]["tasks"]) == ["perplexity", "colours", "generate"]
    assert report["config"]["tasks"][0]["window"] == 16
    assert not (lora_run["run"] / "eval" / "metrics.png").exists()  # one model: no chart
    again = _cli("eval", lora_run["run"], "--config", lora_run["config"], "--quiet")
    assert again.returncode == 2 and "is not empty; pass --overwrite" in again.stderr
    assert _cli("eval", lora_run["run"], "--config", lora_run["config"], "--quiet",
                "--overwrite").returncode == 0


def test_two_processes_give_the_one_process_report(lora_run, tmp_path):
    """torchrun, 2 CPU processes (gloo): each runs half the batches; gathered, the metrics
    and every prediction are those of one process (both with one thread each)."""
    args = ["eval", lora_run["run"], "--config", lora_run["config"], "--quiet",
            "--compare", "base"]
    one = run_cli(*args, "--out", tmp_path / "one", env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert one.returncode == 0, one.stderr
    two = run_cli(*args, "--out", tmp_path / "two", python_args=TORCHRUN_2, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    for x, y in zip(a["models"], b["models"], strict=True):
        for task in x["tasks"]:
            assert x["tasks"][task]["metrics"] == y["tasks"][task]["metrics"], task
    assert (tmp_path / "one" / "predictions.jsonl").read_text() == \
        (tmp_path / "two" / "predictions.jsonl").read_text()


def test_a_training_recipes_eval_block_runs_after_training(tiny_model_dir, text_data, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          val=text_data["val"], out=tmp_path / "run", train={"max_steps": 3})
    data = yaml.safe_load(recipe.read_text())
    data["data"]["max_length"] = 256  # no truncation: eval and validation see the same tokens
    data["eval"] = {"tasks": [{"task": "perplexity"},  # data.val, with the recipe's data keys
                              {"task": "generate", "data": str(pairs), "max_new_tokens": 3}]}
    recipe.write_text(yaml.safe_dump(data))
    result = _cli("train", recipe)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert summary["eval"]["perplexity"]["tokens"] > 0
    assert summary["eval"]["perplexity"]["loss"] == \
        report["models"][0]["tasks"]["perplexity"]["metrics"]["loss"]["value"]
    # the trained model's perplexity task equals the loop's own validation loss
    assert abs(summary["eval"]["perplexity"]["loss"] - summary["final_val_loss"]) < 1e-4
    assert "exact_match" in summary["eval"]["generate"]
    from peftune.recipe import load_recipe  # the run's recipe.yaml, eval: block included, loads

    assert [t.task for t in load_recipe(tmp_path / "run" / "recipe.yaml").eval.tasks] == \
        ["perplexity", "generate"]
    # bad eval data stops the run before it trains, leaving nothing behind
    data["eval"]["tasks"][1]["data"] = str(tmp_path / "missing.jsonl")
    data["output"]["dir"] = str(tmp_path / "run2")
    recipe.write_text(yaml.safe_dump(data))
    result = _cli("train", recipe)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("error: eval.tasks[1].data: no such file or directory: "
                                     f"{tmp_path / 'missing.jsonl'}")
    assert not (tmp_path / "run2").exists()


def test_lm_eval_bridge_is_skipped_with_one_line_when_not_installed(tiny_model_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval is installed here")
    result = _cli("eval", tiny_model_dir, "--lm-eval", "hellaswag", "--out", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        "lm-eval: skipped (lm-evaluation-harness is not installed: pip install lm-eval)"]
    assert not (tmp_path / "o").exists()


# --- bad input: one line, exit 2, nothing written -------------------------------------------


def _bad_files(root: Path, tiny: Path) -> dict:
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (root / "empty.jsonl").write_text("\n")
    (root / "notadapter").mkdir(exist_ok=True)
    (root / "full").mkdir(exist_ok=True)
    (root / "full" / "keep.txt").write_text("mine")
    write_jsonl(root / "mc.jsonl", [{"prompt": "q", "choice": ["a", "b"], "answer": 0}])
    write_jsonl(root / "ok.jsonl", [{"text": "a b c"}])
    (root / "eval.yaml").write_text(
        "eval:\n  tasks:\n    - task: perplexity\n      data: ok.jsonl\n      windw: 8\n"
        "    - task: choice\n      data: mc.jsonl\n      stop: [x]\n")
    return {"tiny": tiny}


BAD = [
    (["nope", "--task", "perplexity", "--data", "ok.jsonl"],
     "TARGET nope: no such directory; give a training run directory"),
    (["--model", "./missing", "--task", "perplexity", "--data", "ok.jsonl"],
     "--model ./missing: no such model directory"),
    (["{tiny}", "--adapter", "notadapter", "--task", "perplexity", "--data", "ok.jsonl"],
     "--adapter notadapter: no adapter_config.json, so not a PEFT adapter directory"),
    (["{tiny}", "--task", "perplexty", "--data", "ok.jsonl"],
     "--task: eval.tasks[0].task: must be one of perplexity, choice, generate, preference; got "
     "'perplexty' (did you mean perplexity?)"),
    (["{tiny}", "--task", "generate", "--data", "ok.jsonl", "--metrics", "bleu"],
     "--metrics: eval.tasks[0].metrics[0]: must be one of exact_match, contains, regex_match; "
     "got 'bleu'"),
    (["{tiny}", "--task", "choice", "--data", "ok.jsonl", "--window", "8"],
     "--window: eval.tasks[0].window: task choice has no such key; only task perplexity reads it"),
    (["{tiny}", "--task", "perplexity", "--data", "missing.jsonl"],
     "eval.tasks[0].data: no such file or directory: missing.jsonl"),
    (["{tiny}", "--task", "perplexity", "--data", "bad.jsonl"],
     "eval.tasks[0].data: bad.jsonl:2: invalid JSON: Expecting value (column 10)"),
    (["{tiny}", "--task", "choice", "--data", "mc.jsonl"],
     "eval.tasks[0].data: mc.jsonl:1: missing field; the row has: answer, choice, prompt "
     "(field 'choices')"),
    (["{tiny}", "--task", "perplexity", "--data", "empty.jsonl"],
     "eval.tasks[0].data: empty.jsonl has no usable examples"),
    (["{tiny}", "--task", "perplexity"], "--task: eval.tasks[0].data: required"),
    (["{tiny}", "--config", "eval.yaml"],
     "eval.yaml:5: eval.tasks[0].windw: unknown key (did you mean window?)"),
    (["{tiny}", "--task", "perplexity", "--data", "ok.jsonl", "--out", "full"],
     "--out full: is not empty; pass --overwrite"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[b[1][:40] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_model_dir, tmp_path, args, message,
                                                        capsys, monkeypatch):
    """The first row through a real `peftune eval` process, the others through the same entry
    point in this process (a fresh interpreter per row costs seconds of imports)."""
    files = _bad_files(tmp_path, tiny_model_dir)
    first = (args, message) == BAD[0]
    args = [a.format(**files) for a in args]
    if "--out" not in args:
        args += ["--out", "written"]
    if first:
        result = _cli("eval", *args, cwd=tmp_path)
        code, stderr = result.returncode, result.stderr
    else:
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("PEFTUNE_DEBUG", raising=False)
        code, _, stderr = main_in_process(capsys, "eval", *args)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in stderr
    assert len(lines) == (2 if "eval.yaml" in args else 1), lines  # the file has two mistakes
    if "eval.yaml" in args:
        assert "eval.yaml:8: eval.tasks[1].stop: task choice has no such key" in lines[1]
    assert not (tmp_path / "written").exists()
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_an_adapter_for_another_base_names_both(lora_run, tmp_path, text_data):
    from peftune.models import build_tiny_model

    other = build_tiny_model(tmp_path / "wide", hidden_size=48, layers=2, heads=4)
    result = _cli("eval", "--model", other, "--adapter", lora_run["run"] / "adapter",
                  "--task", "perplexity", "--data", text_data["val"], "--out", tmp_path / "o")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert f"does not match the base model {other}" in lines[0]
    assert "trained on" in lines[0] and "size mismatch" in lines[0]
    assert not (tmp_path / "o").exists()


def test_eval_help_does_not_import_torch():
    result = run_cli("eval", "--help", python_args=IMPORTTIME, timeout=120)
    assert result.returncode == 0 and "--compare" in result.stdout
    assert not imported_modules(result.stderr) & {"torch", "transformers", "datasets", "peft"}


def test_bench_eval_quick_measures_both_loops_on_the_same_tokens(tmp_path):
    out = tmp_path / "bench.json"
    done = run_script("bench_eval", "--quick", "--out", out, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["check"]["same_tokens"] and report["check"]["loss_diff"] < 1e-5
    assert report["peftune"]["tokens_per_s"] > 0 and report["bare"]["tokens_per_s"] > 0
    assert isinstance(report["overhead"]["pass"], bool)
    assert "peftune eval overhead vs bare loop" in done.stdout


def test_a_chat_runs_eval_takes_the_runs_data_format(tiny_model_dir, tmp_path):
    """`peftune eval RUN --task perplexity --data chat.jsonl`: the run trained on chat rows,
    so the rows are read as chat (was: a 'missing field text' line per row)."""
    from peftune.evaluate.command import eval_command

    chats = write_jsonl(tmp_path / "chat.jsonl", [
        {"conversation": [{"role": "user", "content": p["prompt"]},
                          {"role": "assistant", "content": p["response"]}]} for p in PAIRS])
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=chats,
                          out=tmp_path / "run", train={"max_steps": 2})
    spec = yaml.safe_load(recipe.read_text())
    spec["data"].update({"format": "chat", "messages_field": "conversation"})
    recipe.write_text(yaml.safe_dump(spec))
    assert _cli("train", recipe).returncode == 0
    report = eval_command(target=str(tmp_path / "run"), model=None, adapter=None, quant=None,
                          config=None, flags={"task": "perplexity", "data": str(chats)},
                          batch_size=None, compare=[], out=tmp_path / "ev", overwrite=False,
                          quiet=True, lm_eval=None)
    (task,) = report["config"]["tasks"]
    assert task["format"] == "chat" and task["messages_field"] == "conversation"
    assert report["models"][0]["tasks"]["perplexity"]["metrics"]["loss"]["n"] == len(PAIRS)
