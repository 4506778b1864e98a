"""Training: one run from a recipe (`run.py`, which tells it in order), its Accelerate loop
(`loop.py`), and `launch.py` for `peftune train` itself (one process, or several)."""
