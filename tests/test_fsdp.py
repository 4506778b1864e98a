"""FSDP (version 2, fully_shard) on CPU over gloo, 2 processes (configs/fsdp_cpu.yaml): the
parameters and optimizer state are sharded, yet training equals 1 process with twice the
accumulation, a checkpoint holds the full trainable weights and the full optimizer state (by
name), `--resume` under FSDP continues exactly, the same checkpoint resumes on 1 process as a
1-process checkpoint does, a 1-process checkpoint resumes under FSDP, and the exported adapter
is whole and loads with peft. FSDP version 1 is refused on CPU with one line.
(Measured here: every adapter difference below is 0, bitwise.)

Every launched run has a timeout (a hang fails the test) and OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import (
    LAUNCH_ENV,
    REPO,
    adapter_weights,
    make_text_rows,
    max_abs_diff,
    read_metrics,
    run_cli,
    write_jsonl,
    write_recipe,
)

FSDP_CPU = REPO / "configs" / "fsdp_cpu.yaml"


def _cli(*args: str, cache: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=timeout, env={**LAUNCH_ENV, "PEFTUNE_CACHE": str(cache)})


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def _resume_here(recipe: Path, run: Path) -> None:
    from peftune.recipe import load_recipe
    from peftune.train.run import run_train

    run_train(load_recipe(recipe, [f"output.dir={run}"]), resume=True, quiet=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """An FSDP run checkpointed at step 2 and resumed under FSDP to step 4, and 1 process x
    accumulation 2 (the same global batch) to step 4 with a checkpoint at step 2. Validation
    data of 5 micro-batches: the ranks take 3 and 2, so FSDP's collective forward must be
    padded on rank 1."""
    from peftune.recipe import load_recipe
    from peftune.train.run import run_train

    root = tmp_path_factory.mktemp("fsdp")
    train = write_jsonl(root / "train.jsonl", make_text_rows(64, seed=0))
    val = write_jsonl(root / "val.jsonl", make_text_rows(10, seed=1))
    recipe = write_recipe(root / "r.yaml", model=tiny_model_dir, data=train, val=val,
                          out=root / "fsdp", train={"max_steps": 4, "batch_size": 2,
                                                    "save_every": 2, "eval_every": 2})
    spec = yaml.safe_load(recipe.read_text())
    spec["data"]["packing"] = False  # 10 rows in 5 validation micro-batches of 2
    recipe.write_text(yaml.safe_dump(spec, sort_keys=False))
    cache = root / "cache"
    first = _cli("train", str(recipe), "train.max_steps=2", "--accelerate-config", str(FSDP_CPU),
                 cache=cache)
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copytree(root / "fsdp", root / "fsdp-at-2")  # the step-2 run, before the resume
    resumed = _cli("train", str(recipe), "--resume", "--accelerate-config", str(FSDP_CPU),
                   cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming from") == 1 and resumed.stdout.count("done: 4 steps") == 1
    previous = os.environ.get("PEFTUNE_CACHE")
    os.environ["PEFTUNE_CACHE"] = str(cache)  # a module fixture: no monkeypatch
    try:
        run_train(load_recipe(recipe, ["train.grad_accum=2", f"output.dir={root / 'accum'}"]),
                  quiet=True)
        # one step with the plain full-logits loss: FSDP's chunked losses must equal it
        run_train(load_recipe(recipe, ["train.grad_accum=2", "train.max_steps=1",
                                       "train.chunked_loss=false", f"output.dir={root / 'plain'}"]),
                  quiet=True)
    finally:
        if previous is None:
            os.environ.pop("PEFTUNE_CACHE", None)
        else:
            os.environ["PEFTUNE_CACHE"] = previous
    return {"root": root, "recipe": recipe, "cache": cache}


def test_fsdp_two_processes_train_resume_and_export_what_one_process_trains(runs):
    root = runs["root"]
    fsdp, accum = adapter_weights(root / "fsdp"), adapter_weights(root / "accum")
    diff = max_abs_diff(fsdp, accum)
    print(f"FSDP 2 processes (resumed at step 2) vs 1 process x accumulation 2: max abs "
          f"adapter diff {diff:.3g}")
    assert diff <= 1e-6
    assert max(float(t.abs().max()) for t in accum.values()) > 1e-3  # it trained something

    records, reference = read_metrics(root / "fsdp"), read_metrics(root / "accum")
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [s for s, _ in losses] == [1, 2, 3, 4]  # one record per step, rank 0 writes
    ref_losses = [r["loss"] for r in reference if "loss" in r]
    assert all(abs(a - b) <= 1e-6 for (_, a), b in zip(losses, ref_losses, strict=True))
    plain = read_metrics(root / "plain")  # before any update: the forward alone, FSDP vs 1 process
    first_val = [next(r["val_loss"] for r in run if r.get("step") == 0 and "val_loss" in r)
                 for run in (records, plain)]
    assert first_val[0] == pytest.approx(first_val[1], rel=1e-6)
    assert losses[0][1] == pytest.approx(next(r["loss"] for r in plain if "loss" in r), rel=1e-6)
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    ref_val = [(r["step"], r["val_loss"]) for r in reference if "val_loss" in r]
    assert [s for s, _ in val] == [0, 2, 4] and [s for s, _ in ref_val] == [0, 2, 4]
    assert all(abs(a - b) <= 1e-5 for (_, a), (_, b) in zip(val, ref_val, strict=True))

    # The checkpoint holds full tensors (the 1-process shapes), not rank 0's shards, and the
    # optimizer state of every trainable parameter, by name, complete.
    import torch

    for step in (2, 4):
        ckpt, ref = root / "fsdp" / "checkpoints" / f"step-{step}", root / "accum" / "checkpoints" / f"step-{step}"
        weights, ref_weights = _load(ckpt / "trainable.safetensors"), _load(ref / "trainable.safetensors")
        assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in ref_weights.items()}
        assert max_abs_diff(weights, ref_weights) <= 1e-6
        training = torch.load(ckpt / "training_state.pt", weights_only=True)
        assert training["optimizer_format"] == "by-name"
        state = training["optimizer"]["state"]
        assert sorted(state) == sorted(weights)
        # The 1-process state is keyed by position in the param groups, the FSDP one by name
        # (its param groups list the names in that order).
        order = [name for group in training["optimizer"]["param_groups"] for name in group["params"]]
        ref_state = torch.load(ref / "training_state.pt", weights_only=True)["optimizer"]["state"]
        assert sorted(ref_state) == list(range(len(order)))
        for position, name in enumerate(order):
            assert state[name]["exp_avg_sq"].shape == weights[name].shape
            for key in ("exp_avg", "exp_avg_sq"):
                assert float((state[name][key] - ref_state[position][key]).abs().max()) <= 1e-9
            assert float(state[name]["step"]) == step

    # The export is whole (written once, from gathered weights) and loads with peft.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((root / "fsdp" / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    loaded = PeftModel.from_pretrained(base, str(root / "fsdp" / "adapter"))
    params = dict(loaded.named_parameters())
    for key, tensor in fsdp.items():
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(params[name].detach(), tensor), key
    assert not list((root / "fsdp").glob(".tmp-*"))


def test_fsdp_checkpoint_resumes_on_one_process_and_one_process_checkpoint_under_fsdp(runs):
    """Across engines and process counts: the FSDP step-2 checkpoint resumed on 1 process gives
    what the 1-process step-2 checkpoint resumed on 1 process gives (the optimizer state by
    name equals the one by position); and the 1-process checkpoint resumed under FSDP gives the
    uninterrupted 1-process run (the position-keyed state converted to names, then sharded)."""
    root, recipe = runs["root"], runs["recipe"]
    from_fsdp, from_plain, plain_under_fsdp = (root / n for n in ("r-fsdp", "r-plain", "r-mixed"))
    for target in (from_fsdp, from_plain, plain_under_fsdp):
        shutil.copytree(root / "fsdp-at-2", target)
    for target in (from_plain, plain_under_fsdp):  # 1 process x accumulation 2: same position
        shutil.rmtree(target / "checkpoints" / "step-2")
        shutil.copytree(root / "accum" / "checkpoints" / "step-2", target / "checkpoints" / "step-2")
    _resume_here(recipe, from_fsdp)
    _resume_here(recipe, from_plain)
    diff = max_abs_diff(adapter_weights(from_fsdp), adapter_weights(from_plain))
    print(f"FSDP checkpoint vs 1-process checkpoint, both resumed on 1 process: {diff:.3g}")
    assert diff <= 1e-6
    # another global batch
    assert max_abs_diff(adapter_weights(from_fsdp), adapter_weights(root / "accum")) > 1e-4

    mixed = _cli("train", str(recipe), "--resume", f"output.dir={plain_under_fsdp}",
                 "--accelerate-config", str(FSDP_CPU), cache=runs["cache"])
    assert mixed.returncode == 0, mixed.stderr[-3000:]
    diff = max_abs_diff(adapter_weights(plain_under_fsdp), adapter_weights(root / "accum"))
    print(f"1-process checkpoint resumed under FSDP vs the uninterrupted 1-process run: {diff:.3g}")
    assert diff <= 1e-6


def test_fsdp_on_cpu_is_version_2_only(monkeypatch):
    """Launched with an FSDP config without a GPU: version 2 is switched on (Accelerate would
    run DDP), version 1 refused with one line; no FSDP config, nothing changes."""
    from peftune.errors import InputError
    from peftune.train.setup import _fsdp_on_cpu

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert _fsdp_on_cpu() is False
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert _fsdp_on_cpu() is True
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(InputError) as refused:
        _fsdp_on_cpu()
    assert refused.value.lines == ["fsdp_config.fsdp_version: FSDP version 1 needs a GPU; on "
                                   "CPU use fsdp_version: 2 (configs/fsdp_cpu.yaml)"]
    assert refused.value.shown_by_main  # rank 1: rank 0 prints it


def test_a_recipe_eval_block_is_refused_under_fsdp_and_zero3(tmp_path, tiny_model_dir, text_data):
    """Rank 0 runs the eval: block alone after training; a sharded model's forward needs every
    process, so it would hang: refused before training, naming the way out."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from peftune.errors import InputError
    from peftune.recipe import load_recipe
    from peftune.train.setup import check_engine

    recipe = load_recipe(write_recipe(
        tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"], out=tmp_path / "run",
        eval={"tasks": [{"task": "perplexity", "data": str(text_data["val"])}]}))
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    zero = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(
        deepspeed_plugin=SimpleNamespace(zero_stage=3, deepspeed_config={})))
    for accelerator in (fsdp, zero):
        with pytest.raises(InputError) as refused:
            check_engine(recipe, accelerator)
        assert refused.value.lines[0].startswith("eval: the model is sharded across the processes")
    check_engine(recipe, SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))  # DDP: fine
    without = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"tasks": []})})
    check_engine(without, fsdp)


def test_a_checkpoint_without_optimizer_state_is_refused_not_resumed_wrongly():
    """A DeepSpeed checkpoint holds no optimizer state (ZeRO keeps it partitioned): resuming it
    anywhere, or resuming anything under DeepSpeed, is one clear line, not a silent restart."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from peftune.errors import InputError
    from peftune.train.sharded import BY_NAME, load_optimizer

    plain = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    with pytest.raises(InputError, match="written under DeepSpeed and holds no optimizer state"):
        load_optimizer(plain, None, None, None, BY_NAME)
    deepspeed = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    with pytest.raises(InputError, match="under DeepSpeed peftune does not restore"):
        load_optimizer(deepspeed, None, None, {"state": {}, "param_groups": []}, None)
