"""Smoke test of the data-selection benchmark: `--quick` builds a small pool and target,
runs peftune's DSIR and ZIP-FIT (and the reference packages where installed) and writes
the report JSON with every figure and a verdict per target."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import read_jsonl, run_script


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(module) is not None for module in modules)


@pytest.mark.slow  # a benchmark script's smoke run: make test-all / make bench
def test_bench_select_quick_writes_every_figure(tmp_path):
    done = run_script("bench_select", "--quick", "--workdir", tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "bench_select.json").read_text())

    config, inputs = report["config"], report["inputs"]
    assert config["quick"] and config["pool_size"] > config["k"]
    assert sum(inputs["pool_labels"].values()) == config["pool_size"]
    pool = read_jsonl(Path(inputs["files"]["pool"]))
    target = read_jsonl(Path(inputs["files"]["target"]))
    assert len(pool) == config["pool_size"] and len(target) == config["target_size"]
    assert {row["label"] for row in target} == {config["target_label"]}

    peftune = report["dsir"]["peftune"]
    assert peftune["selected"] == config["k"]
    for key in ("wall_seconds", "docs_per_s", "peak_rss_bytes"):
        assert peftune[key] > 0, key
    assert 0 <= peftune["precision"] <= 1
    assert isinstance(peftune["kl_reduction"], float)

    zipfit = report["zipfit"]
    assert zipfit["gzip"]["formula_check"]["rows"] > 0
    assert zipfit["gzip"]["zlib_loop"]["pairs"] == zipfit["gzip"]["peftune"]["pairs"]
    assert zipfit["gzip"]["ratio_vs_zlib_loop"] > 0

    targets = report["targets"]
    expected = {"zipfit_formula_gzip", "zipfit_gzip_vs_zlib_loop"}
    if _installed("lz4"):
        expected |= {"zipfit_formula_lz4", "zipfit_scale_rss"}
        assert zipfit["scale"]["peak_rss_bytes"] > 0
        if _installed("zip_fit", "zstandard", "brotli", "datasets"):
            expected |= {"zipfit_vs_reference_scores", "zipfit_lz4_vs_reference"}
    if _installed("data_selection", "nltk", "joblib", "tqdm"):
        expected |= {"dsir_speedup", "dsir_kl_reduction", "dsir_precision"}
        assert report["dsir"]["reference"]["selected"] == config["k"]
    assert expected <= set(targets)
    for item in targets.values():
        assert isinstance(item["pass"], bool), item
        assert item["what"] in done.stdout
    # Scores must match the formula exactly whatever the machine's speed.
    assert targets["zipfit_formula_gzip"]["pass"]
    assert "wrote" in done.stdout
