"""Smoke test of the training benchmark (`make bench`): `--quick` runs all three systems
(peftune, HF Trainer, bare loop) on a tiny model and writes the report JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


def test_bench_quick_writes_three_systems_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PEFTUNE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())

    systems = report["systems"]
    assert set(systems) == {"peftune", "trainer", "bare"}
    steps = report["config"]["steps"]
    for name, system in systems.items():
        assert system["steps"] == steps, name
        assert system["tokens"] > 0, name
        assert system["tokens_per_s"] > 0, name
        assert system["steady_tokens_per_s"] > 0, name
        assert system["peak_rss_bytes"] > 0, name
    # peftune and the bare loop train on the same packed batches; the Trainer pads.
    assert report["check"]["same_real_tokens"]
    assert report["check"]["max_abs_loss_diff"] < 1e-3
    assert systems["trainer"]["fill"] < 1.0

    ratios = report["ratios"]
    assert set(ratios) == {"peftune_vs_trainer_tokens_per_s", "peftune_vs_trainer_peak_rss",
                           "loop_overhead_vs_bare"}
    for ratio in ratios.values():
        assert isinstance(ratio["value"], float)
        assert isinstance(ratio["pass"], bool)
    for line in ("peftune / Trainer effective tokens/s", "peftune / Trainer peak RSS",
                 "peftune loop overhead vs bare loop"):
        assert line in done.stdout
