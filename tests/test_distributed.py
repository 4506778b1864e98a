"""Multi-process training on CPU (gloo): 2 processes train exactly what 1 process trains with
twice the accumulation, through `--nproc` and `--accelerate-config`, resume included; a bad
input on the processes stops them all with one line; the launch flags and configs/ are checked.

Every launched run has a timeout (a hang fails the test) and OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import (
    LAUNCH_ENV,
    REPO,
    adapter_weights,
    max_abs_diff,
    read_metrics,
    run_cli,
    write_jsonl,
    write_recipe,
)

CONFIGS = REPO / "configs"


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=timeout, env=LAUNCH_ENV)


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


def _tokens(run: Path) -> dict[int, int]:
    return {r["step"]: r["tokens"] for r in read_metrics(run) if "loss" in r}


def _train_here(recipe: Path, overrides: list[str]) -> dict:
    from peftune.recipe import load_recipe
    from peftune.train.run import run_train

    return run_train(load_recipe(recipe, overrides), quiet=True)


# ---- the data position: which micro-batches each process takes ---------------------------

def test_each_process_takes_every_nth_micro_batch_of_a_step_across_epochs():
    from peftune.train.checkpoint import TrainerState
    from peftune.train.loop import Loop, next_micro_batches

    def loop(world: int, rank: int, accum: int) -> Loop:
        return Loop(model=None, optimizer=None, scheduler=None, hooks=None, accelerator=None,
                    batches_for_epoch=lambda e: [(e, i) for i in range(5)], total_steps=9,
                    grad_accum=accum, max_grad_norm=None, log_every=1, eval_every=None,
                    save_every=None, num_processes=world, process_index=rank)

    one, states = loop(1, 0, 4), [TrainerState() for _ in range(3)]
    two = [loop(2, 0, 2), loop(2, 1, 2)]
    for _ in range(3):  # 3 steps of 4 micro-batches: crosses the 5-batch epoch boundary twice
        whole = next_micro_batches(one, states[0])
        parts = [next_micro_batches(two[r], states[1 + r]) for r in (0, 1)]
        assert parts[0] == whole[0::2] and parts[1] == whole[1::2]
        assert states[1] == states[2] == states[0]  # the position counts all processes
    assert (states[0].epoch, states[0].batch_in_epoch) == (2, 2)


# ---- launch flags and configs ------------------------------------------------------------

@pytest.mark.parametrize("flags, names", [
    (["--nproc", "0"], "--nproc"),
    (["--nproc", "two"], "--nproc"),
    (["--nproc", "-3"], "--nproc"),
    (["--accelerate-config", "no/such/config.yaml"], "--accelerate-config"),
])
def test_bad_launch_flags_exit_2_with_one_line(tmp_path, tiny_model_dir, text_data, flags, names):
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run")
    result = _cli("train", str(recipe), *flags, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"error: {names}"), lines
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_every_shipped_accelerate_config_loads_with_the_keys_accelerate_reads():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    files = sorted(CONFIGS.glob("*.yaml"))
    launch_flags = {action.dest for action in launch_command_parser()._actions}
    kinds = set()
    for path in files:
        text = path.read_text()
        assert text.startswith("#"), f"{path.name}: no header comment"
        raw = yaml.safe_load(text)
        config = load_config_from_file(str(path))  # unknown top-level keys raise here
        assert DistributedType(raw["distributed_type"]) == config.distributed_type
        for section in ("fsdp_config", "deepspeed_config"):
            for key in raw.get(section) or {}:  # accelerate maps these to launch flags
                assert key in launch_flags or f"fsdp_{key}" in launch_flags, (path.name, key)
        kinds.add((raw["distributed_type"], raw.get("num_machines", 1) > 1,
                   (raw.get("deepspeed_config") or {}).get("zero_stage")))
    assert {("NO", False, None), ("MULTI_GPU", False, None), ("FSDP", False, None),
            ("DEEPSPEED", False, 2), ("DEEPSPEED", False, 3), ("MULTI_GPU", True, None)} <= kinds
    assert len(files) == 10
    qlora = yaml.safe_load((CONFIGS / "fsdp_qlora.yaml").read_text())
    assert qlora["fsdp_config"]["fsdp_use_orig_params"] is False
    assert "bnb_4bit_quant_storage" in (CONFIGS / "fsdp_qlora.yaml").read_text()


# ---- 2 processes == 1 process with twice the accumulation ----------------------------------

def test_two_processes_train_the_adapter_one_process_trains_with_accumulation_2(
        tmp_path, tiny_model_dir, text_data):
    """2 processes x micro-batch 2 (through --accelerate-config to step 2, then resumed with
    --nproc 2 to step 4) against 1 process x micro-batch 2 x accumulation 2 and 1 process x
    micro-batch 4, same seed and data."""
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "two", train={"max_steps": 4, "batch_size": 2,
                                                       "save_every": 2})
    first = _cli("train", str(recipe), "train.max_steps=2", "--accelerate-config",
                 str(CONFIGS / "ddp_cpu.yaml"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "two" / "checkpoints" / "step-2").is_dir()
    resumed = _cli("train", str(recipe), "--resume", "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming from") == 1  # rank 0 prints, the other is quiet
    assert resumed.stdout.count("done: 4 steps") == 1

    _train_here(recipe, ["train.grad_accum=2", f"output.dir={tmp_path / 'accum'}"])
    # the plain full-logits loss: the chunked one under DDP gives its losses (the adapters
    # differ by float rounding only, which Adam's normalisation enlarges on tiny gradients)
    _train_here(recipe, ["train.grad_accum=2", "train.chunked_loss=false",
                         f"output.dir={tmp_path / 'plain'}"])
    _train_here(recipe, ["train.batch_size=4", f"output.dir={tmp_path / 'wide'}"])

    two, accum, wide = (adapter_weights(tmp_path / name) for name in ("two", "accum", "wide"))
    diff = max_abs_diff(two, accum)
    print(f"2 processes vs accumulation 2: max abs adapter diff {diff:.3g}; "
          f"vs micro-batch 4: {max_abs_diff(two, wide):.3g}")
    assert diff <= 1e-6
    assert max_abs_diff(two, wide) <= 2e-5  # another padding width: float rounding only
    base = adapter_weights(tmp_path / "accum")
    assert max(float(t.abs().max()) for t in base.values()) > 1e-3  # it trained something

    assert max_abs_diff(two, adapter_weights(tmp_path / "plain")) <= 1e-4
    first_plain = _losses(tmp_path / "plain")[0][1]
    assert _losses(tmp_path / "two")[0][1] == pytest.approx(first_plain, rel=1e-6)

    losses_two, losses_accum = _losses(tmp_path / "two"), _losses(tmp_path / "accum")
    assert [s for s, _ in losses_two] == [1, 2, 3, 4]  # one record per step: rank 0 writes
    assert all(abs(a - b) <= 1e-6 for (_, a), (_, b) in zip(losses_two, losses_accum, strict=True))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["tokens"] == json.loads((tmp_path / "accum" / "summary.json").read_text())["tokens"]

    # The 2-process checkpoint resumed on 1 process: the data position counts both processes'
    # micro-batches, so 1-process steps 3 and 4 train on what 2-process step 3 trained on.
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    shutil.rmtree(tmp_path / "one" / "checkpoints" / "step-4")
    from peftune.recipe import load_recipe
    from peftune.train.run import run_train

    run_train(load_recipe(recipe, [f"output.dir={tmp_path / 'one'}"]), resume=True, quiet=True)
    tokens, two_tokens = (_tokens(tmp_path / name) for name in ("one", "two"))
    assert sorted(tokens) == [1, 2, 3, 4] and tokens[2] == two_tokens[2]
    assert tokens[4] == two_tokens[3] and tokens[3] < tokens[4]


def test_bad_data_on_two_processes_stops_both_with_one_line(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"text": "alpha beta"}] * 6 + [{"txt": "no text"}])
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=data,
                          out=tmp_path / "run")
    result = _cli("train", str(recipe), "--nproc", "2")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.jsonl" in lines[0], lines
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
