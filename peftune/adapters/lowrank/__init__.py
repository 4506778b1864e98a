"""Native low-rank adapters: one generalised layer (`layer.py`, ΔW = s·B·M·A) and the
methods built on it (`configs.py` registers them; `methods.py`, `inits.py` implement them;
`export.py` writes them as plain PEFT LoRA adapters). Importing this package is torch-free;
the torch modules load when a model is built."""
