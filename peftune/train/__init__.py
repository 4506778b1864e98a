"""The training runner: one Accelerate loop (`loop.py`), set up and finished by `runner.py`."""
