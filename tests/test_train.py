"""End-to-end training on a tiny local model: artifacts, exactness of accumulation and
resume, exported adapters that reproduce the trained model, quantized bases, failures.
(Resuming after SIGKILL, SIGINT and SIGTERM is tested in test_faults.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    NO_DEBUG,
    adapter_weights,
    assert_eval_forward_keeps_gradients,
    assert_one_error_line,
    logits_of,
    read_metrics,
    run_cli,
    train_in_process,
    write_recipe,
)
from safetensors.torch import load_file

from peftune.errors import InputError, TrainingError
from peftune.recipe import load_recipe


def _cli(*args: str):  # a refusal is one line, with no traceback even under PEFTUNE_DEBUG
    return run_cli(*args, env=NO_DEBUG)


def test_lora_run_writes_every_artifact_and_the_adapter_reproduces_the_model(
        tmp_path, tiny_model_dir, text_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          val=text_data["val"], out=tmp_path / "run",
                          train={"max_steps": 12, "eval_every": 6})
    built, summary = train_in_process(recipe)
    run = tmp_path / "run"
    for name in ("recipe.yaml", "metrics.jsonl", "summary.json", "loss.png", "README.md",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    card = (run / "README.md").read_text()  # the model card: from the summary and the recipe
    assert f"A `lora` fine-tune of `{tiny_model_dir}`" in card
    assert f"PeftModel.from_pretrained(base, \"{run / 'adapter'}\")" in card
    assert f"| final validation loss | {summary['final_val_loss']:.4g} |" in card
    assert f"{summary['trainable_params']:,} of {summary['total_params']:,}" in card
    assert (run / "recipe.yaml").read_text().strip() in card
    records = read_metrics(run)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 13))
    assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= set(train_records[0])
    assert [r["step"] for r in records if "val_loss" in r] == [0, 6, 12]  # 0: the baseline
    first, last = (sum(r["loss"] for r in part) / 3 for part in (train_records[:3], train_records[-3:]))
    assert last < first - 0.1  # it learns (a random 2-layer base with a frozen head learns slowly)
    assert summary["steps"] == 12 and summary["trainable_params"] > 0
    assert json.loads((run / "summary.json").read_text())["final_loss"] == summary["final_loss"]

    trained = built.unwrapped_model.eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, run / "adapter").eval()
    torch.testing.assert_close(logits_of(loaded), logits_of(trained), rtol=0, atol=1e-5)
    # and the adapter really changed something
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert (logits_of(plain) - logits_of(loaded)).abs().max() > 1e-3


def test_full_fine_tuning_exports_a_model_directory(tmp_path, tiny_model_dir, text_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run", adapter={"method": "full"},
                          train={"max_steps": 4, "lr": 1e-3})
    built, summary = train_in_process(recipe)
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "model.safetensors").is_file() and not (tmp_path / "run" / "adapter").exists()
    assert summary["trainable_params"] == summary["total_params"]
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.testing.assert_close(logits_of(reloaded), logits_of(built.unwrapped_model.eval()),
                               rtol=0, atol=1e-6)
    assert AutoTokenizer.from_pretrained(model_dir).chat_template


def _adapter_after_one_step(tmp_path, tiny_model_dir, train, name, batch_size, grad_accum):
    recipe = write_recipe(tmp_path / f"{name}.yaml", model=tiny_model_dir, data=train,
                          out=tmp_path / name,
                          train={"max_steps": 1, "batch_size": batch_size,
                                 "grad_accum": grad_accum, "max_grad_norm": None})
    train_in_process(recipe)
    return adapter_weights(tmp_path / name)


def test_accumulation_gives_the_same_update_as_a_large_batch(tmp_path, tiny_model_dir, text_data):
    big = _adapter_after_one_step(tmp_path, tiny_model_dir, text_data["train"], "big", 8, 1)
    small = _adapter_after_one_step(tmp_path, tiny_model_dir, text_data["train"], "small", 2, 4)
    odd = _adapter_after_one_step(tmp_path, tiny_model_dir, text_data["train"], "odd", 4, 1)
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-5, atol=1e-7)
    assert any((odd[n] - big[n]).abs().max() > 1e-6 for n in big)  # the test can fail


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(
        tmp_path, tiny_model_dir, text_data, monkeypatch):
    import peftune.train.objectives as loop  # where the sft loss is computed

    calls = {"n": 0}
    real = loop.token_loss_sum

    def poisoned(model, batch, **kwargs):
        calls["n"] += 1
        loss = real(model, batch, **kwargs)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(loop, "token_loss_sum", poisoned)
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run", train={"max_steps": 6, "save_every": 2})
    with pytest.raises(TrainingError, match="loss became nan at step 4"):
        train_in_process(recipe)
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-2"]
    assert load_file(run / "checkpoints" / "step-2" / "trainable.safetensors")
    assert not (run / "adapter").exists()


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_lora_trains_over_a_quantized_base(tmp_path, tiny_model_dir, text_data, quant):
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run",
                          quant={"method": quant, "compute_dtype": "float32"},
                          train={"max_steps": 8, "lr": 1e-2})
    built, summary = train_in_process(recipe)
    records = read_metrics(tmp_path / "run")
    assert records[-1]["loss"] < records[0]["loss"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_an_eval_pass_on_a_4bit_base_leaves_the_next_gradients_unchanged(
        tmp_path, tiny_model_dir, text_data):
    """The AVX512-BF16 repacking trap: an eval forward must not corrupt later LoRA grads."""
    from peftune.adapters import apply_adapter
    from peftune.models import load_model_and_tokenizer

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", model=tiny_model_dir,
                                      data=text_data["train"], out=tmp_path / "run",
                                      quant={"method": "nf4", "compute_dtype": "float32"}))
    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(recipe.model, recipe.quant, device=torch.device("cpu"))
    model, _ = apply_adapter(model, recipe.adapter)
    assert_eval_forward_keeps_gradients(model)


# ---- bad input: one line, exit 2, no traceback, nothing written --------------------------

def test_missing_data_file_fails_cleanly_and_writes_nothing(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir,
                          data=tmp_path / "nope.jsonl", out=tmp_path / "run")
    assert_one_error_line(_cli("train", str(recipe)), "data.train: no such file or directory")
    assert not (tmp_path / "run").exists()


def test_invalid_data_row_fails_cleanly_and_writes_nothing(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=bad,
                          out=tmp_path / "run")
    assert_one_error_line(_cli("train", str(recipe)), "bad.jsonl:2")
    assert not (tmp_path / "run").exists()


def test_non_empty_output_dir_needs_resume_or_overwrite(tmp_path, tiny_model_dir, text_data):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run")
    # a directory that is not a run is never a run's output (with or without --overwrite)
    assert_one_error_line(_cli("train", str(recipe)), "is an existing directory that is not a "
                                                      "peftune run (no recipe.yaml)")
    # a previous run's directory needs --resume or --overwrite
    (tmp_path / "run" / "recipe.yaml").write_text(recipe.read_text())
    assert_one_error_line(_cli("train", str(recipe)), "is not empty; pass --resume")
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


def test_overwrite_only_ever_deletes_a_previous_run(tmp_path, tiny_model_dir, text_data):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "mine")
    assert_one_error_line(_cli("train", str(recipe), "--overwrite"), "not a peftune run (no recipe.yaml)")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_resume_without_a_checkpoint_fails_cleanly(tmp_path, tiny_model_dir, text_data):
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run")
    assert_one_error_line(_cli("train", str(recipe), "--resume"), "--resume: no checkpoint")
    assert not (tmp_path / "run").exists()


def test_model_not_found_offline_fails_with_one_line(tmp_path, text_data):
    recipe = write_recipe(tmp_path / "r.yaml", model="no-such-org/no-such-model",
                          data=text_data["train"], out=tmp_path / "run")
    assert_one_error_line(_cli("train", str(recipe)), "is not in the local hub cache and the hub cannot be reached")
    assert not (tmp_path / "run").exists()


def test_check_output_dir_refuses_resume_and_overwrite_together(tmp_path):
    with pytest.raises(InputError, match="contradict"):
        from peftune.train.output import check_output_dir

        check_output_dir(tmp_path, resume=True, overwrite=True)
