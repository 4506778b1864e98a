"""Data selection by target distribution: DSIR (hashed n-gram importance resampling) and
ZIP-FIT (compression alignment), streamed over pools larger than memory.

`run_select(config, out=...)` is the library entry point (`peftune select-data` and a
training recipe's `data.select` both call it); `kl_reduction` is the quality metric every
report carries. Importing this package is cheap: the runner loads on first use.
"""

from peftune.select.config import SelectConfig
from peftune.select.kl import kl_divergence, kl_reduction

__all__ = ["SelectConfig", "kl_divergence", "kl_reduction", "run_select"]


def run_select(*args, **kwargs):  # noqa: ANN002, ANN003 - thin lazy wrapper
    from peftune.select.runner import run_select as run

    return run(*args, **kwargs)
