"""peftune/compat.py: one test per use of a dependency's private API. A failure here after an
upgrade means the private API changed: read the new version's source, update the function in
compat.py and the version its docstring names."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

from peftune import compat

# ---- accelerate -----------------------------------------------------------------------------


def test_accelerate_process_state_exists_is_false_then_true():
    """`PartialState._shared_state`: empty in a fresh process, filled by PartialState()."""
    script = (
        "from accelerate.state import PartialState\n"
        "from peftune.compat import accelerate_process_state_exists\n"
        "assert isinstance(PartialState._shared_state, dict), type(PartialState._shared_state)\n"
        "assert accelerate_process_state_exists() is False\n"
        "PartialState(cpu=True)\n"
        "assert accelerate_process_state_exists() is True\n"
        "PartialState()  # a second one shares the first one's state\n"
        "assert accelerate_process_state_exists() is True\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env={k: v for k, v in os.environ.items()
                                              if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
    assert result.returncode == 0, result.stderr[-3000:]


def test_accelerator_mixed_precision_reads_the_accelerator_state():
    """`AcceleratorState._shared_state["_mixed_precision"]`: the precision of the process's
    Accelerator, absent once the state is reset."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    assert isinstance(AcceleratorState._shared_state, dict)
    compat.reset_accelerator_state()  # whatever an earlier test left
    assert compat.accelerator_mixed_precision() is None
    Accelerator(cpu=True, mixed_precision="no")
    assert "_mixed_precision" in AcceleratorState._shared_state
    assert compat.accelerator_mixed_precision() == "no"


def test_reset_accelerator_state_keeps_the_process_state():
    """`AcceleratorState._reset_state(reset_partial_state=False)`: the precision is forgotten,
    the process state (the process group) is kept, and a new Accelerator may be made."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    assert "reset_partial_state" in inspect.signature(AcceleratorState._reset_state).parameters
    compat.reset_accelerator_state()
    Accelerator(cpu=True, mixed_precision="no")
    compat.reset_accelerator_state()
    assert compat.accelerator_mixed_precision() is None
    assert compat.accelerate_process_state_exists()
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    assert str(accelerator.mixed_precision) == "no"


# ---- torch ----------------------------------------------------------------------------------


def test_torchrun_launch_parses_torchrun_flags_into_a_launch_config(monkeypatch):
    """`torch.distributed.run.get_args_parser` / `config_from_args`: torchrun's flags give a
    LaunchConfig and the Python command each process runs."""
    from torch.distributed.launcher.api import LaunchConfig

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # else config_from_args sets it for the process
    config, entrypoint, args = compat.torchrun_launch([
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--rdzv-id", "abc",
        "--nnodes", "1", "--nproc-per-node", "2", "-m", "peftune.cli", "train", "r.yaml",
        "train.lr=1e-4"])
    assert isinstance(config, LaunchConfig)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (1, 1, 2)
    assert (config.rdzv_backend, config.rdzv_endpoint, config.run_id) == ("c10d", "localhost:0",
                                                                          "abc")
    assert entrypoint == sys.executable
    assert args[-5:] == ["-m", "peftune.cli", "train", "r.yaml", "train.lr=1e-4"]
