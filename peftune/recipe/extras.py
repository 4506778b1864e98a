"""Optional packages a recipe may ask for, each installed by a pip extra of its own name
(`pip install 'peftune[tensorboard]'`). Torch-free: `peftune validate` checks them."""

from __future__ import annotations

import importlib.util

# output.report_to name -> (module it imports, the extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing_tracker(name: str) -> str | None:
    """Why `output.report_to: [name]` cannot run here, or None."""
    module, extra = TRACKERS[name]
    if installed(module):
        return None
    return (f"{name} is not installed; pip install 'peftune[{extra}]' (or pip install {extra}), "
            f"or remove {name} from output.report_to")
