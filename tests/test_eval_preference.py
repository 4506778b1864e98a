"""`peftune eval --task preference`: log-prob and reward accuracy on held-out pairs.

The metrics are checked against numbers this file computes on its own (each sequence alone,
tokenized here, from the full logits); then a DPO run against its base through the command
line, the same numbers as the run's own end-of-training eval; then bad input, one line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import WORDS, main_in_process, make_pairs, pref_recipe, train_in_process, write_jsonl

from peftune.recipe.schema import DataSection, EvalSection, EvalTask

BETA = 0.5  # the run's objective's: not the task's default 0.1
PAIRS = 24


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir):
    """A DPO run (6 steps) whose recipe evaluates its validation pairs after training: the
    training pairs themselves, which 6 steps have learned (held-out pairs would need more)."""
    root = tmp_path_factory.mktemp("evalpref")
    pairs = write_jsonl(root / "pairs.jsonl", make_pairs(PAIRS, seed=0))
    recipe = pref_recipe(root, tiny_model_dir, pairs, {"name": "dpo", "beta": BETA},
                         name="dpo", train={"max_steps": 6}, val=pairs,
                         eval={"tasks": [{"task": "preference"}]})
    _, summary = train_in_process(recipe)
    return {"run": root / "dpo", "val": pairs, "summary": summary}


def _alone(model, tokenizer, prompt: str, response: str) -> tuple[float, int]:
    """log π(response|prompt) and its token count, the sequence alone, from the full logits:
    BOS + prompt + "\\n" (the default template), then the response and EOS as targets."""
    bos = [tokenizer.bos_token_id] if tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id \
        else []
    context = bos + tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]
    target = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([context + target])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    picked = logprobs[len(context) - 1:].gather(1, torch.tensor(target)[:, None])
    return float(picked.sum()), len(target)


def test_metrics_equal_each_sequence_scored_alone(dpo_run, tiny_model_dir):
    """Batched, packed pairs scored through the chunked head give what each sequence alone
    gives; the run's reference is its base with the adapter switched off; the base itself
    has log-prob metrics and no rewards."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftune.evaluate.runner import run_eval
    from peftune.evaluate.targets import resolve_target, run_base

    target = resolve_target(str(dpo_run["run"]))
    task = EvalTask(task="preference", data=str(dpo_run["val"]), beta=0.3, batch_size=3)
    report = run_eval(targets=[target, run_base(target)], config=EvalSection(tasks=[task]),
                      out=None, quiet=True)
    run, base = (model["tasks"]["preference"]["metrics"] for model in report["models"])

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      str(dpo_run["run"] / "adapter")).eval()
    rows = [json.loads(line) for line in dpo_run["val"].read_text().splitlines()]
    sides = ("chosen", "rejected")
    pol = np.array([[_alone(model, tokenizer, r["prompt"], r[side]) for side in sides]
                    for r in rows])  # (pairs, 2, [logp, length])
    with model.disable_adapter():
        ref = np.array([[_alone(model, tokenizer, r["prompt"], r[side])[0] for side in sides]
                        for r in rows])

    def expect(logp: np.ndarray, length: np.ndarray, ref: np.ndarray | None) -> dict:
        mean = logp / length
        out = {"logp_accuracy": np.mean(mean[:, 0] > mean[:, 1]),
               "logp_margin": np.mean(mean[:, 0] - mean[:, 1]),
               "chosen_logp": logp[:, 0].mean(), "rejected_logp": logp[:, 1].mean(),
               "chosen_length": length[:, 0].mean(), "rejected_length": length[:, 1].mean()}
        if ref is not None:
            reward = 0.3 * (logp - ref)
            out.update(reward_accuracy=np.mean(reward[:, 0] > reward[:, 1]),
                       reward_margin=np.mean(reward[:, 0] - reward[:, 1]),
                       chosen_reward=reward[:, 0].mean(), rejected_reward=reward[:, 1].mean())
        return out

    for got, want in ((run, expect(pol[..., 0], pol[..., 1], ref)),
                      (base, expect(ref, pol[..., 1], None))):
        assert set(got) == set(want)
        for name, value in want.items():
            assert got[name]["n"] == len(rows)
            assert got[name]["value"] == pytest.approx(value, rel=1e-5, abs=1e-5), name
    compared = report["deltas"]["dpo - base"]["preference"]
    assert "logp_margin" in compared and not any(name.startswith("reward") for name in compared)
    assert run["logp_margin"]["value"] != base["logp_margin"]["value"]


def test_a_dpo_run_against_its_base_from_the_command_line(dpo_run, tmp_path, capsys, monkeypatch):
    """Rewards with the run's β for the run, none for the base; the numbers are the run's own
    end-of-training eval of the same pairs (in memory there, loaded from disk here)."""
    out = tmp_path / "out"
    code, stdout, stderr = main_in_process(capsys, "eval", dpo_run["run"], "--task", "preference",
                                           "--data", dpo_run["val"], "--compare", "base",
                                           "--out", out, "--batch-size", "4")
    assert code == 0, stderr
    assert "reward_accuracy" in stdout and "Δ base" in stdout
    report = json.loads((out / "report.json").read_text())
    (task,) = report["config"]["tasks"]
    assert task["beta"] == BETA and "format" not in task
    run, base = (model["tasks"]["preference"]["metrics"] for model in report["models"])
    assert {"reward_accuracy", "reward_margin"} <= set(run) and not set(base) & {
        "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"}
    assert run["reward_margin"]["value"] > 0 and run["reward_accuracy"]["value"] > 0.75
    assert run["logp_accuracy"]["value"] > base["logp_accuracy"]["value"]
    for name in ("logp_accuracy", "logp_margin", "chosen_logp", "rejected_logp"):
        assert run[name]["value"] != base[name]["value"], name
    trained = dpo_run["summary"]["eval"]["preference"]
    assert set(trained) == set(run)
    for name, value in trained.items():
        assert run[name]["value"] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * PAIRS and {line["row"] for line in lines} == set(range(1, PAIRS + 1))
    assert (out / "metrics.png").is_file()


LONG = " ".join(WORDS * 3)
BAD = [
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a b", "chosen": "c"}], [],
     "eval.tasks[0].data: bad.jsonl:2: missing field; the row has: chosen, prompt (field "
     "'rejected')"),
    ([{"prompt": "a b", "chosen": "c d", "rejected": "c d"}], [],
     "eval.tasks[0].data: bad.jsonl:1: chosen and rejected are the same response"),
    ([{"prompt": LONG, "chosen": "c", "rejected": "d e"}], ["--max-length", "16"],
     "eval.tasks[0].data: bad.jsonl:1: the prompt leaves no room for the response within "
     "eval.tasks[0].max_length=16; set eval.tasks[0].truncation: left"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}], ["--format", "chat"],
     "--format: eval.tasks[0].format: task preference has no such key"),
]


@pytest.mark.parametrize(("rows", "flags", "message"), BAD, ids=["missing", "same", "no-room",
                                                                 "format"])
def test_bad_pairs_are_one_line_exit_2_and_write_nothing(tiny_model_dir, tmp_path, capsys,
                                                         monkeypatch, rows, flags, message):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PEFTUNE_DEBUG", raising=False)
    code, _, stderr = main_in_process(capsys, "eval", tiny_model_dir, "--task", "preference",
                                      "--data", data.name, *flags, "--out", "written")
    lines = stderr.strip().splitlines()
    assert code == 2 and "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "written").exists()


def test_truncation_left_keeps_the_response_of_a_long_prompt(tiny_model_dir, tmp_path):
    from peftune.evaluate.runner import run_eval
    from peftune.evaluate.targets import resolve_target

    data = write_jsonl(tmp_path / "long.jsonl",
                       [{"prompt": LONG, "chosen": "c", "rejected": "d e"}])
    task = EvalTask(task="preference", data=str(data), max_length=16, truncation="left")
    report = run_eval(targets=[resolve_target(str(tiny_model_dir))],
                      config=EvalSection(tasks=[task]), out=None, quiet=True)
    metrics = report["models"][0]["tasks"]["preference"]["metrics"]
    assert (metrics["chosen_length"]["value"], metrics["rejected_length"]["value"]) == (2, 4)


def test_preference_task_keys_mirror_the_data_section():
    from peftune.evaluate.preference import DATA_KEYS

    for key in DATA_KEYS:
        mine, theirs = EvalTask.model_fields[key], DataSection.model_fields[key]
        assert (mine.annotation, mine.default) == (theirs.annotation, theirs.default), key
    assert EvalTask(task="preference").beta is None  # the run's objective's, else 0.1
