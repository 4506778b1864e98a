"""`make demo` end to end, shortened (`--quick`): tiny model, corpus, pre-training, LoRA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_demo_runs_end_to_end(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--quick",
                             "--workdir", str(tmp_path)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "runs" / "demo" / "lora-tests"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "runs" / "demo" / "pretrain" / "model" / "model.safetensors").is_file()
    assert (run / "loss.png").is_file()
    val = [r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "val_loss" in r]
    assert val[-1] < val[0]  # the LoRA fine-tune improved on held-out test files
    assert "adapter" in result.stdout and "loss.png" in result.stdout
