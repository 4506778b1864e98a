"""Checkpoints: `checkpoints/step-N/` with the trainable weights (safetensors), optimizer,
scheduler and RNG states and the data position, written atomically and pruned to the last K.

Atomic: everything is written into `checkpoints/.tmp-step-N` and renamed into place, so a
run killed mid-write leaves the previous checkpoint intact and no half-written step-N.
Checked: `manifest.json` (the sha256 and size of every other file) is written last inside the
temp dir, and `--resume` verifies the latest checkpoint against it, falling back to the one
before when a file is missing, truncated or corrupted. A checkpoint without a manifest
(written before peftune wrote them) is used unverified, with a note.
A write that fails (a full disk) removes its temp dir and stops the run. SIGINT and SIGTERM
stop the run at the next step boundary with a checkpoint (peftune/train/interrupts.py); while
one is written they are blocked in the writing thread and only recorded, so they never cut it
short.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from peftune.errors import InputError, TrainingError
from peftune.train.interrupts import signals_held

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_REQUIRED = ("trainable.safetensors", "training_state.pt", "trainer_state.json")


@dataclass
class TrainerState:
    """Where the loop stands: enough to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    batch_in_epoch: int = 0  # index of the next micro-batch within that epoch
    tokens: int = 0  # non-padding tokens seen
    target_tokens: int = 0  # tokens that counted in the loss
    elapsed_s: float = 0.0  # training wall time before this process started
    val_s: float = 0.0  # of the run's wall time, spent in validation passes


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
                    scheduler: Any, keep: int, optimizer_state: tuple[Any, str] | None = None
                    ) -> Path:
    """`optimizer_state`: (state, format) gathered under a sharding engine (peftune/train/
    sharded.py), written instead of `optimizer.state_dict()`, which holds one rank's shard."""
    root = run_dir / CHECKPOINTS
    final = root / f"step-{state.step}"
    tmp = root / f".tmp-step-{state.step}"
    with signals_held():
        try:
            _write_checkpoint(tmp, state=state, trainable=trainable, optimizer=optimizer,
                              scheduler=scheduler, optimizer_state=optimizer_state)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            previous = latest_checkpoint(run_dir)
            kept = f"{previous} is intact" if previous else "no earlier checkpoint exists"
            raise TrainingError(
                f"could not write checkpoint {final.name} into {root}: "
                f"{err.strerror or err} ({errno.errorcode.get(err.errno, err.errno)}); "
                f"nothing half-written was left and {kept}. Free space (or fix the "
                "directory's permissions), then resume with --resume") from err
        if final.exists():  # only after a resume that repeats a step; replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(root)
    _prune(root, keep)
    return final


def _write_checkpoint(tmp: Path, *, state: TrainerState, trainable: dict, optimizer: Any,
                      scheduler: Any, optimizer_state: tuple[Any, str] | None) -> None:
    import torch
    from safetensors.torch import save_file

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable, tmp / "trainable.safetensors")
    training = {"scheduler": scheduler.state_dict(), "rng": rng_state()}
    if optimizer_state is not None:
        training["optimizer"], training["optimizer_format"] = optimizer_state
    else:
        training["optimizer"] = optimizer.state_dict()
    torch.save(training, tmp / "training_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
    write_manifest(tmp)  # last: a checkpoint with a whole manifest was written whole
    _fsync_dir(tmp)


def write_manifest(directory: Path) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=2))


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint is whole; otherwise what is wrong, naming the file."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        missing = [name for name in _REQUIRED if not (path / name).is_file()]
        return f"{missing[0]} is missing" if missing else None  # pre-manifest: unverified
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name in [n for n in _REQUIRED if n not in files] + sorted(files):
        file = path / name
        if name not in files or not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != files[name]["size"]:
            return f"{name} is {size:,} bytes, the manifest says {files[name]['size']:,} (truncated?)"
        if _sha256(file) != files[name]["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST} (corrupted)"
    return None


def resumable_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The latest checkpoint that verifies, and one line for each later one that did not
    (or for a pre-manifest one used unverified)."""
    notes = []
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            if not (path / MANIFEST).is_file():
                notes.append(f"checkpoint {path} has no {MANIFEST} (written by an older "
                             "peftune): resuming from it unverified")
            return path, notes
        notes.append(f"checkpoint {path} is unusable: {problem}; trying the one before")
    return None, notes


def probe_output_location(out: Path, *, key: str = "output.dir") -> None:
    """Write, fsync and delete a small file where the run will be written (output.dir, or
    its nearest existing parent), so a read-only or full location fails before training."""
    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        return  # a file in the way: check_output_dir names it
    probe = where / f".peftune-write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0" * 65536)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        reason = err.strerror or str(err)
        raise InputError(f"{key}: cannot write to {where} ({reason}); choose a writable "
                         f"{key} with free space") from err
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def check_free_space(out: Path, needed_bytes: int, *, key: str = "output.dir") -> None:
    """Refuse to start when the disk cannot hold even the trained weights."""
    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < needed_bytes:
        raise InputError(f"{key}: {where} has {free / 2**20:,.1f} MiB free; this run writes at "
                         f"least {needed_bytes / 2**20:,.1f} MiB (checkpoints and the adapter). "
                         f"Free space or choose another {key}")


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
    _fsync_path(path)


def _fsync_path(path: Path) -> None:
    """fsync a directory itself, so a rename or new entry survives a power loss."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
