"""`peftune compare`: train several adapter methods, or several training objectives, on one
recipe's data, steps and seed, and tabulate what each run measured (compare.json, compare.md,
compare.png). Torch-free to import: each run trains in a process of its own."""

from peftune.compare.runner import exit_code, run_compare

__all__ = ["exit_code", "run_compare"]
