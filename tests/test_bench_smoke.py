"""Smoke tests of the training benchmarks (`make bench`): bench_train's `--quick` runs peftune,
the HF Trainer and the bare loop on a tiny model over the mixed-length text and writes the
report JSON; bench_preference's `--model tiny` runs peftune sft and dpo (and TRL's
DPOTrainer where installed) over the same tokens. The figures that count come from the real
model (docs/memory.md)."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from conftest import run_script


@pytest.mark.slow  # a benchmark script's smoke run: make test-all / make bench
def test_bench_quick_writes_three_systems_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    done = run_script("bench_train", "--quick", "--out", out, timeout=240,
                      env={"PEFTUNE_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())

    block = report["shapes"]["mixed"]
    systems = block["systems"]
    assert set(systems) == {"peftune", "trainer", "bare"}
    steps = report["config"]["steps"]
    for name, system in systems.items():
        assert system["steps"] == steps, name
        assert system["tokens"] > 0, name
        assert system["steady_tokens_per_s"] > 0, name
        assert system["peak_rss_bytes"] > 0, name
    # peftune and the bare loop train on the same packed batches and loss; the Trainer pads.
    assert block["check"]["same_real_tokens"]
    assert block["check"]["max_abs_loss_diff"] < 1e-4
    assert systems["trainer"]["fill"] < 1.0

    ratios = report["ratios"]
    assert set(ratios) == {"mixed_tokens_per_s", "mixed_peak_rss", "mixed_loop_overhead"}
    for ratio in ratios.values():
        assert isinstance(ratio["value"], float) and isinstance(ratio["pass"], bool)
    for line in ("mixed: peftune / trainer tokens/s", "mixed: peftune / trainer peak RSS",
                 "mixed: peftune loop overhead vs bare"):
        assert line in done.stdout


@pytest.mark.slow  # a benchmark script's smoke run: make test-all / make bench
def test_bench_preference_tiny_prints_the_table_and_both_ratios(tmp_path):
    out = tmp_path / "bench_preference.json"
    done = run_script("bench_preference", "--model", "tiny", "--steps", 2, "--out", out,
                      timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())

    systems, data = report["systems"], report["data"]
    trl = importlib.util.find_spec("trl") is not None
    assert set(systems) == ({"sft", "dpo", "trl"} if trl else {"sft", "dpo"})
    for name, system in systems.items():
        assert system["steps"] == 3 and system["timed_steps"] == 2, name
        assert system["seconds_per_step"] > 0 and system["peak_rss_bytes"] > 0, name
    # the point of the comparison: each timed sft step holds the dpo step's very tokens
    assert data["same_sequences_every_step"] and data["truncated"] == 0
    assert systems["sft"]["tokens_per_step"] == systems["dpo"]["tokens_per_step"] \
        == data["timed_tokens_per_step"]
    assert systems["dpo"]["reference"] == "adapter_off"

    for label in ("peftune sft", "peftune dpo (adapter-off ref)", "TRL DPOTrainer + peft"):
        assert re.search(rf"^{re.escape(label)}\s+\S", done.stdout, re.M), label
    for line, target in (("dpo / sft step time (same tokens)", "1.6x"),
                         ("dpo / sft peak RSS", "1.3x")):
        assert re.search(rf"^{re.escape(line)}\s+[\d.]+x\s+target <= {re.escape(target)} "
                         r"(PASS|MISS)$", done.stdout, re.M), line
    for ratio in report["ratios"].values():
        assert isinstance(ratio["value"], float) and isinstance(ratio["pass"], bool)
