"""Shared fixtures: a tiny local model and small local data, built once per session.

Nothing is downloaded: the model is a 2-layer Llama with hidden size 32 and a byte-level
tokenizer, and the data is generated text.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega").split()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from peftune.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", hidden_size=32,
                            layers=2, heads=4, seed=0)


def make_text_rows(n: int, *, seed: int = 0) -> list[dict]:
    """Variable-length rows of a simple repetitive language the tiny model can learn."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randrange(len(WORDS))
        length = rng.randint(3, 20)
        rows.append({"text": " ".join(WORDS[(start + i) % len(WORDS)] for i in range(length))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"train": write_jsonl(root / "train.jsonl", make_text_rows(64, seed=0)),
            "val": write_jsonl(root / "val.jsonl", make_text_rows(12, seed=1))}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTUNE_CACHE", str(tmp_path / "cache"))


def write_recipe(path: Path, *, model: Path, data: Path, out: Path, val: Path | None = None,
                 **sections) -> Path:
    """A small, fast recipe; `sections` override keys, e.g. train={"max_steps": 4}."""
    recipe = {
        "model": {"path": str(model)},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"train": str(data), "max_length": 64},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 2e-2, "log_every": 1,
                  "warmup_ratio": 0.0, "scheduler": "constant"},
        "output": {"dir": str(out)},
    }
    if val is not None:
        recipe["data"]["val"] = str(val)
    for section, values in sections.items():
        if section == "adapter":  # a method's keys replace the default LoRA's whole
            recipe["adapter"] = values
        else:
            recipe.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
