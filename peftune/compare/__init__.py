"""`peftune compare` and `peftune sweep`: train several adapter methods, several training
objectives, or every combination of a grid of recipe values, on one recipe's data, steps and
seed, and tabulate what each run measured (compare.json, compare.md, compare.png). Torch-free
to import: each run trains in a process of its own."""

from peftune.compare.runner import exit_code, run_compare, run_sweep

__all__ = ["exit_code", "run_compare", "run_sweep"]
