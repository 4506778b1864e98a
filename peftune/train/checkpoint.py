"""Checkpoints: `checkpoints/step-N/` with the trainable weights (safetensors), optimizer,
scheduler and RNG states and the data position, written atomically and pruned to the last K.

Atomic: everything is written into `checkpoints/.tmp-step-N` and renamed into place, so a
run killed mid-write leaves the previous checkpoint intact and no half-written step-N.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Where the loop stands: enough to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    batch_in_epoch: int = 0  # index of the next micro-batch within that epoch
    tokens: int = 0  # non-padding tokens seen
    target_tokens: int = 0  # tokens that counted in the loss
    elapsed_s: float = 0.0  # training wall time before this process started


def rng_state() -> dict:
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, *, state: TrainerState, trainable: dict, optimizer: Any,
                    scheduler: Any, keep: int) -> Path:
    import torch
    from safetensors.torch import save_file

    root = run_dir / CHECKPOINTS
    final = root / f"step-{state.step}"
    tmp = root / f".tmp-step-{state.step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable, tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state()}, tmp / "training_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
    _fsync_dir(tmp)
    if final.exists():  # only after a resume that repeats a step; replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(root, keep)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = list_checkpoints(run_dir)
    return steps[-1] if steps else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path) -> tuple[TrainerState, dict, dict]:
    """(trainer state, trainable tensors, {optimizer, scheduler, rng})."""
    import torch
    from safetensors.torch import load_file

    state = TrainerState(**json.loads((path / "trainer_state.json").read_text()))
    trainable = load_file(path / "trainable.safetensors")
    training = torch.load(path / "training_state.pt", weights_only=True)
    return state, trainable, training


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Drop `.tmp-step-*` left by a run that was killed while saving."""
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        for tmp in root.glob(".tmp-step-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def _prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
