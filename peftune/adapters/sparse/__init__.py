"""Sparse fine-tuning: a small set of the base's own weights changes, W' = W + scatter(idx, δ),
on one layer (`layer.py`), so the result merges exactly. `configs.py` holds the methods
(PaCA, FISH mask, LT-SFT, SpIEL, DSEE) and their registration; `selection.py` how each picks
its entries, `training_hooks.py` what changes them while training (LT-SFT's phase switch,
SpIEL's prune-and-regrow), `model.py` applies any of them, `export.py` writes and loads the
native adapter (indices + deltas) and merges it.
Importing this package is torch-free; the torch modules load when a model is built.
"""
