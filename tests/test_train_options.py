"""Training options: gradient checkpointing, bf16, 8-bit AdamW, schedules, epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, recipe_refusal, write_recipe
from safetensors.torch import load_file

from peftune.recipe import load_recipe
from peftune.train.run import run_train


def _run(tmp_path: Path, name: str, model: Path, data: Path, **sections) -> tuple[dict, Path]:
    recipe = write_recipe(tmp_path / f"{name}.yaml", model=model, data=data,
                          out=tmp_path / name, **sections)
    summary = run_train(load_recipe(recipe), quiet=True)
    return summary, tmp_path / name


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").open() if "loss" in line]


def test_gradient_checkpointing_gives_the_same_update(tmp_path, tiny_model_dir, text_data):
    plain = dict(train={"max_steps": 2, "gradient_checkpointing": False})
    ckpt = dict(train={"max_steps": 2, "gradient_checkpointing": True})
    _, a = _run(tmp_path, "plain", tiny_model_dir, text_data["train"], **plain)
    _, b = _run(tmp_path, "ckpt", tiny_model_dir, text_data["train"], **ckpt)
    wa = load_file(a / "adapter" / "adapter_model.safetensors")
    wb = load_file(b / "adapter" / "adapter_model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6)


def test_every_nth_layer_checkpointing_gives_the_same_update_and_checkpoints_those_layers(
        tmp_path, tiny_model_dir, text_data):
    """gradient_checkpointing: N keeps layers 0, N, 2N, ... checkpointed, the rest not; the
    update is the one without checkpointing."""
    from peftune.models.loading import load_model
    from peftune.models.tiny import build_tiny_model

    four = build_tiny_model(tmp_path / "four", layers=4)
    recipe = load_recipe(write_recipe(tmp_path / "n.yaml", model=four, data=text_data["train"],
                                      out=tmp_path / "n", train={"gradient_checkpointing": 2}))
    model = load_model(recipe.model, recipe.quant, device=torch.device("cpu"),
                       gradient_checkpointing=recipe.train.gradient_checkpointing)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False, True, False]
    runs = {}
    for name, value in (("none", False), ("every2", 2)):
        _, runs[name] = _run(tmp_path, name, four, text_data["train"],
                             train={"max_steps": 2, "gradient_checkpointing": value})
    wa, wb = (load_file(runs[n] / "adapter" / "adapter_model.safetensors") for n in ("none", "every2"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [-1, "some", 2.5])
def test_a_bad_checkpointing_value_is_refused(tmp_path, tiny_model_dir, text_data, value):
    message = recipe_refusal(tmp_path, model=tiny_model_dir, data=text_data["train"],
                             train={"gradient_checkpointing": value})
    assert message.endswith("train.gradient_checkpointing: expected true, false, or N >= 1 "
                            "(checkpoint every N-th decoder layer), got " + repr(value))


def test_auto_precision_is_bf16_only_on_cpus_with_native_bf16():
    from peftune.device import cpu_has_bf16
    from peftune.train.setup import mixed_precision

    cpu = torch.device("cpu")
    assert mixed_precision("auto", cpu, cpu_flags={"avx512f", "avx512_bf16"}) == "bf16"
    assert mixed_precision("auto", cpu, cpu_flags={"amx_bf16", "amx_tile"}) == "bf16"
    assert mixed_precision("auto", cpu, cpu_flags={"fp", "asimd", "bf16"}) == "bf16"  # Arm
    assert mixed_precision("auto", cpu, cpu_flags={"avx512f", "avx512bw", "avx2"}) == "no"
    assert mixed_precision("bf16", cpu, cpu_flags=set()) == "bf16"  # asked for: forced
    assert mixed_precision("fp32", cpu, cpu_flags={"avx512_bf16"}) == "no"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert cpu_has_bf16() == any(f in flags.split() for f in ("avx512_bf16", "amx_bf16", "bf16"))


def test_quantized_layers_compute_in_fp32_on_cpus_without_native_bf16(monkeypatch):
    """quant.compute_dtype auto: emulated bf16 made a 4-bit base ~18x slower on such CPUs."""
    import peftune.device
    from peftune.quant import compute_dtype
    from peftune.recipe.schema import QuantSection

    cpu = torch.device("cpu")
    monkeypatch.setattr(peftune.device, "cpu_flags", lambda: {"avx512f", "avx2"})
    assert compute_dtype(QuantSection(method="nf4"), cpu) == torch.float32
    assert compute_dtype(QuantSection(method="nf4", compute_dtype="bfloat16"), cpu) == torch.bfloat16
    monkeypatch.setattr(peftune.device, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert compute_dtype(QuantSection(method="nf4"), cpu) == torch.bfloat16
    assert compute_dtype(QuantSection(method="int4", compute_dtype="float32"), cpu) == torch.float32


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_trains_every_method(tmp_path, tiny_model_dir, text_data, method):
    adapter = {"method": "full"} if method == "full" else {"method": "lora", "r": 4}
    summary, _ = _run(tmp_path, method, tiny_model_dir, text_data["train"], adapter=adapter,
                      train={"max_steps": 2, "gradient_checkpointing": True, "lr": 1e-3})
    assert summary["steps"] == 2 and summary["final_loss"] < 10


def test_bf16_autocast_trains_on_cpu(tmp_path, tiny_model_dir, text_data):
    summary, run = _run(tmp_path, "bf16", tiny_model_dir, text_data["train"],
                        train={"max_steps": 3, "precision": "bf16"})
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _records(run))
    # the adapter is kept in full precision
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}


def test_adamw8bit_trains(tmp_path, tiny_model_dir, text_data):
    summary, run = _run(tmp_path, "adam8", tiny_model_dir, text_data["train"],
                        train={"max_steps": 6, "optimizer": "adamw8bit", "lr": 2e-2})
    records = _records(run)
    assert records[-1]["loss"] < records[0]["loss"]


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant"])
def test_schedules_warm_up_then_follow_their_shape(tmp_path, tiny_model_dir, text_data, scheduler):
    _, run = _run(tmp_path, scheduler, tiny_model_dir, text_data["train"],
                  train={"max_steps": 10, "lr": 1e-2, "scheduler": scheduler, "warmup_steps": 2})
    lrs = [r["lr"] for r in _records(run)]  # the rate each step was taken with
    assert lrs[0] == pytest.approx(0.0) and lrs[1] == pytest.approx(0.5e-2)  # warm-up
    assert lrs[2] == pytest.approx(1e-2)  # peak
    if scheduler == "constant":
        assert lrs[-1] == pytest.approx(1e-2)
    else:  # the last step still has a rate; the schedule reaches 0 after it
        assert 0 < lrs[-1] < 1e-2
        assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    if scheduler == "linear":
        assert lrs[6] == pytest.approx(1e-2 * 4 / 8)


def test_epochs_set_the_step_count(tmp_path, tiny_model_dir, text_data):
    # 64 short rows of <= 64 tokens pack into a few rows; 2 epochs = 2 x ceil(rows / batch)
    summary, run = _run(tmp_path, "epochs", tiny_model_dir, text_data["train"],
                        train={"max_steps": None, "epochs": 2, "batch_size": 2})
    from peftune.data import build_datasets, pack_rows
    from peftune.models import load_tokenizer

    recipe = load_recipe(run / "recipe.yaml")
    splits = build_datasets(recipe.data, load_tokenizer(str(tiny_model_dir)), seed=0)
    rows = pack_rows(splits.train, max_length=64, packing=True, seed=0)
    assert summary["steps"] == 2 * -(-len(rows) // 2)
    assert summary["epochs"] == 2


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_inputs_isolate_examples(tiny_model_dir, attention):
    """The loop's explicit block-causal mask gives each packed example the loss it has alone."""
    from transformers import AutoModelForCausalLM

    from peftune.data import TokenizedSet, micro_batches, pack_rows, per_example_losses
    from peftune.train.loss import model_inputs, token_loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    examples = []
    for length in (9, 17, 5, 30, 12):
        ids = torch.randint(5, 250, (length,), generator=gen).numpy().astype("int32")
        labels = ids.copy()
        labels[0] = -100
        examples.append((ids, labels))
    data = TokenizedSet.from_examples(examples)
    packed = micro_batches(pack_rows(data, max_length=40, packing=True, seed=0), batch_size=8,
                           pad_id=0, seed=0, epoch=0, packing=True)[0]
    assert packed["input_ids"].shape[0] < len(examples)  # really packed
    inputs = model_inputs(model, packed)
    assert inputs["attention_mask"].ndim == 4
    with torch.no_grad():
        together = per_example_losses(model(**inputs, use_cache=False).logits, packed)
        alone = {}
        for ids, labels in examples:
            batch = {"input_ids": torch.tensor(ids[None], dtype=torch.long),
                     "labels": torch.tensor(labels[None], dtype=torch.long)}
            alone[len(ids)] = float(token_loss_sum(model, batch))
    assert sorted(together) == pytest.approx(sorted(alone.values()), rel=1e-5, abs=1e-5)


def test_an_optimizer_step_takes_grad_accum_micro_batches_across_epochs():
    from peftune.train.checkpoint import TrainerState
    from peftune.train.loop import Loop, next_micro_batches

    loop = Loop(model=None, optimizer=None, scheduler=None, hooks=None, accelerator=None,
                batches_for_epoch=lambda epoch: [(epoch, i) for i in range(5)], total_steps=4,
                grad_accum=2, max_grad_norm=None, log_every=1, eval_every=None, save_every=None)
    state = TrainerState()
    steps = [next_micro_batches(loop, state) for _ in range(4)]
    assert steps == [[(0, 0), (0, 1)], [(0, 2), (0, 3)], [(0, 4), (1, 0)], [(1, 1), (1, 2)]]
    assert (state.epoch, state.batch_in_epoch) == (1, 3)
    loop.grad_accum = 8  # more than an epoch holds: the step spans epochs
    assert len(next_micro_batches(loop, TrainerState())) == 8


def test_full_model_export_generates_with_a_kv_cache(tmp_path, tiny_model_dir, text_data):
    summary, run = _run(tmp_path, "full", tiny_model_dir, text_data["train"],
                        adapter={"method": "full"}, train={"max_steps": 1})
    assert json.loads((run / "model" / "config.json").read_text())["use_cache"] is True


def test_validation_data_is_evaluated_without_eval_every(tmp_path, tiny_model_dir, text_data):
    recipe = write_recipe(tmp_path / "v.yaml", model=tiny_model_dir, data=text_data["train"],
                          val=text_data["val"], out=tmp_path / "v",
                          train={"max_steps": 3, "eval_every": None})
    summary = run_train(load_recipe(recipe), quiet=True)
    assert summary["final_val_loss"] is not None


def test_nf4_storage_dtype_stores_the_codes_in_that_dtype_and_trains(tmp_path, tiny_model_dir,
                                                                     text_data):
    """quant.storage_dtype (FSDP + QLoRA needs bfloat16): the packed 4-bit weights are held
    in that dtype, and LoRA trains over them as over the default uint8 storage."""
    from peftune.train.setup import build_training

    losses = {}
    for storage in ("uint8", "bfloat16"):
        recipe = load_recipe(write_recipe(
            tmp_path / f"{storage}.yaml", model=tiny_model_dir, data=text_data["train"],
            out=tmp_path / storage, quant={"method": "nf4", "storage_dtype": storage}))
        built = build_training(recipe, quiet=True)
        weight = built.unwrapped_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        assert type(weight).__name__ == "Params4bit"
        assert weight.dtype == getattr(torch, storage)
        summary = run_train(recipe, quiet=True)
        records = read_metrics(tmp_path / storage)
        losses[storage] = [r["loss"] for r in records if "loss" in r]
        assert summary["steps"] == 6 and losses[storage][-1] < losses[storage][0]
    # the same codes in another container: the same run
    assert losses["bfloat16"] == pytest.approx(losses["uint8"], rel=1e-4)


def test_storage_dtype_is_refused_for_int8(tmp_path, tiny_model_dir, text_data):
    from peftune.errors import InputError

    path = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                        out=tmp_path / "run", quant={"method": "int8", "storage_dtype": "bfloat16"})
    with pytest.raises(InputError, match="quant.storage_dtype: applies only to quant.method: "
                                         "nf4 or fp4, not int8"):
        load_recipe(path)
