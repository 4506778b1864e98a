"""Checks that came from fine-tuning a real model: a context longer than the model's, a run
directory left by a run killed before its first checkpoint, a new length on --resume, the
epoch count, throughput without validation time."""

from __future__ import annotations

import json

import pytest
from conftest import NO_DEBUG, read_metrics, run_cli, train_in_session, write_recipe


def _cli(*argv):  # a refusal is one line, with no traceback even under PEFTUNE_DEBUG
    return run_cli(*argv, env=NO_DEBUG)


def test_max_length_beyond_the_models_context_is_refused_at_validate(tmp_path, tiny_model_dir,
                                                                     text_data):
    context = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run")
    done = _cli("validate", recipe, f"data.max_length={context * 2}")
    assert done.returncode == 2 and not (tmp_path / "run").exists()
    (line,) = done.stderr.strip().splitlines()
    assert line.endswith(f"data.max_length: {context * 2} is more than the model's context of "
                         f"{context} positions (max_position_embeddings); use at most {context}")


def test_a_run_killed_before_its_first_checkpoint_can_simply_be_run_again(tmp_path,
                                                                         tiny_model_dir,
                                                                         text_data):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=out, train={"max_steps": 2})
    out.mkdir()
    (out / "recipe.yaml").write_text("model: {}\n")  # what a run killed while loading leaves
    (out / "metrics.jsonl").write_text("")
    done = _cli("train", recipe)
    assert done.returncode == 0, done.stderr
    assert "stopped before its first checkpoint or export; starting it again" in done.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # a finished run is never restarted by accident
    again = _cli("train", recipe)
    assert again.returncode == 2 and "is not empty; pass --resume" in again.stderr


def test_throughput_leaves_out_validation_and_epochs_are_a_fraction(tmp_path, tiny_model_dir,
                                                                     text_data, monkeypatch):
    """Validation passes (made 100 s slower here, on the run's clock) count in val_seconds,
    not in any tokens/s; the summary says how much of an epoch the steps consumed, not how
    many epochs began."""
    import time

    import peftune.train.loop as loop_module

    real, clock, skipped = loop_module.evaluate_loss, time.perf_counter, [0.0]

    def slow_evaluate(loop):
        skipped[0] += 100.0  # a validation pass that takes 100 s more, without the wait
        return real(loop)

    monkeypatch.setattr(loop_module, "evaluate_loss", slow_evaluate)
    monkeypatch.setattr(time, "perf_counter", lambda: clock() + skipped[0])
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          val=text_data["val"], out=tmp_path / "run",
                          train={"max_steps": 4, "eval_every": 1, "log_every": 1})
    _, built, summary, _, out = train_in_session(recipe)
    records = read_metrics(out)
    logged = [r for r in records if "tokens_per_s" in r]
    assert len([r for r in records if "val_loss" in r]) == 5  # step 0 and after every step
    assert summary["val_seconds"] >= 5 * 100
    # each logged window's time (its tokens over its rate) holds no 100 s validation pass
    previous = 0
    for record in logged:
        assert (record["tokens"] - previous) / record["tokens_per_s"] < 100, record
        previous = record["tokens"]
    # train_seconds is rounded to the millisecond
    assert abs(summary["tokens_per_s"] * summary["train_seconds"] - summary["tokens"]) \
        <= summary["tokens_per_s"] * 0.001
    per_epoch = len(built.batches_for_epoch(0))  # 64 rows, batch 4: 16 micro-batches
    assert summary["epochs"] == round(4 / per_epoch, 4) and 0 < summary["epochs"] < 1


def test_resume_with_a_new_length_extends_a_constant_rate_and_refuses_a_decaying_one(
        tmp_path, tiny_model_dir, text_data):
    from peftune.errors import InputError
    from peftune.recipe import load_recipe
    from peftune.train.run import run_train

    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run", train={"max_steps": 2, "save_every": 2,
                                                       "scheduler": "cosine"})
    run_train(load_recipe(recipe), quiet=True)
    with pytest.raises(InputError, match=r"--resume: train.max_steps is 4, the run's recipe.yaml "
                                         r"has 2; its cosine schedule is laid over"):
        run_train(load_recipe(recipe, ["train.max_steps=4"]), resume=True, quiet=True)
    constant = ["train.scheduler=constant", f"output.dir={tmp_path / 'flat'}"]
    run_train(load_recipe(recipe, constant), quiet=True)
    summary = run_train(load_recipe(recipe, [*constant, "train.max_steps=4"]), resume=True,
                        quiet=True)
    assert summary["steps"] == 4


def test_library_warnings_peftune_handles_do_not_reach_the_user(tmp_path, tiny_model_dir,
                                                                text_data):
    """PiSSA's 'changes the base weights' warning: peftune exports it as a plain LoRA on the
    original base, which is what the warning asks for."""
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run", adapter={"method": "pissa", "r": 4},
                          train={"max_steps": 1})
    done = _cli("train", recipe)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr
