"""What an adapter method hands the training loop. The loop calls these and nothing else."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class AdapterHooks:
    """Callbacks a method gives the loop; every one is optional.

    extra_loss(model) -> tensor | None: added to the task loss of every micro-batch
        (already scaled the way the method wants it).
    after_step(model, step) -> None: runs after every optimizer step (pruning, schedules).
    export(model, out_dir, tokenizer) -> None: writes the final artifact into `out_dir`
        (the run's `adapter/` in PEFT format, or `model/` for methods that train base weights).
    trainable_state(model) -> dict: the tensors a checkpoint must hold to resume.
    load_trainable_state(model, state) -> None: the inverse, used by `--resume`.
    after_step hooks run before the gradients are cleared (AdaLoRA's importance needs them).
    before_step(model, step, step_loss) -> None: runs before each optimizer step's forward
        passes, `step` the steps done; `step_loss()` is the loss of this step's batch at the
        current weights, forward passes only, the same on every process (IST scores layers
        with it; a strategy adds these, not a method).
    bind_optimizer(optimizer) -> None: called once the run's optimizer is built (and
        prepared), for methods that move or drop its per-parameter state (SpIEL, LT-SFT).
    """

    export: Callable[[Any, Path, Any], None]
    trainable_state: Callable[[Any], dict]
    load_trainable_state: Callable[[Any, dict], None]
    extra_loss: Callable[[Any], Any] | None = None
    after_step: list[Callable[[Any, int], None]] = field(default_factory=list)
    bind_optimizer: list[Callable[[Any], None]] = field(default_factory=list)
    before_step: list[Callable[[Any, int, Callable[[], float]], None]] = field(default_factory=list)
    artifact: str = "adapter"  # the run-dir entry `export` writes: "adapter" or "model"
    # What the method's init did (calibration examples, seconds, ...), for the run header
    # and summary.json.
    init_report: dict = field(default_factory=dict)
