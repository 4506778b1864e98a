"""Private APIs of our dependencies, each with the version it was checked against.

Every use peftune makes of a library's private (underscored or undocumented) API is a small
function here, its docstring naming the library version it was checked against; the rest of
peftune calls these functions, never the private names. `tests/test_compat.py` has a test per
function that fails loudly when an upgrade removes or changes what it relies on: when one
fails, check the new version's source and update the function (and the version it names).

Grouped by library. Importing this module imports none of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# ---- accelerate ---------------------------------------------------------------------------
# Accelerate keeps its state in process-wide singletons (a "Borg" pattern): every
# PartialState() / AcceleratorState() shares the class attribute `_shared_state`, a dict that
# is empty until the first one is created.


def accelerate_process_state_exists() -> bool:
    """Whether Accelerate's process state (`PartialState`, which holds the process group) has
    been created in this process: `PartialState._shared_state` is non-empty.

    Checked against accelerate 1.16.0."""
    from accelerate.state import PartialState

    return bool(PartialState._shared_state)


def accelerator_mixed_precision() -> str | None:
    """The mixed-precision mode ("no", "bf16", "fp16", ...) held by Accelerate's process-wide
    `AcceleratorState`, or None before the first Accelerator of this process (or after
    `reset_accelerator_state`): `AcceleratorState._shared_state["_mixed_precision"]`, a
    PrecisionType (a str enum) or a str.

    Checked against accelerate 1.16.0."""
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    return getattr(current, "value", current)


def reset_accelerator_state() -> None:
    """Forget the per-run part of Accelerate's state (precision, plugins) and keep the process
    part (`PartialState`, the process group), so that the next Accelerator of this process may
    ask for another precision: `AcceleratorState._reset_state(reset_partial_state=False)`.

    Checked against accelerate 1.16.0."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


# ---- torch --------------------------------------------------------------------------------


def torchrun_launch(argv: Sequence[str]) -> tuple[Any, Any, list[str]]:
    """What `torchrun ARGV` would launch: (LaunchConfig, entrypoint, its arguments), for
    `torch.distributed.launcher.api.elastic_launch`. torchrun's own argument parser and its
    conversion to a launch config (`torch.distributed.run.get_args_parser`,
    `config_from_args`) are not part of torch's documented API.

    Checked against torch 2.13.0."""
    from torch.distributed.run import config_from_args, get_args_parser

    config, entrypoint, args = config_from_args(get_args_parser().parse_args(list(argv)))
    return config, entrypoint, list(args)
