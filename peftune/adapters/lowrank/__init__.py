"""Native low-rank adapters: one generalised layer (`layer.py`, ΔW = s·B·M·A) and the
methods built on it. A method is one config (`configs.py`, `budget_configs.py`: its keys,
factors, init rule and training hooks, and its registration); `model.py` applies any of
them with the rules of `inits.py` and the hooks of `training_hooks.py`; `increlora.py` is
IncreLoRA's own apply; `export.py` writes every method as a plain PEFT LoRA adapter.
Importing this package is torch-free; the torch modules load when a model is built."""
