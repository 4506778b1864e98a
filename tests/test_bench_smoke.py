"""Smoke test of the training benchmark (`make bench`): `--quick` runs peftune, the HF Trainer
and the bare loop on a tiny model over the mixed-length text and writes the report JSON. The
figures that count come from the real model (docs/memory.md)."""

from __future__ import annotations

import json

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
