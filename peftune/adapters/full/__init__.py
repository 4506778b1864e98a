"""Methods that train the base's own weights: `full` (every parameter) and `freeze`
(the last layers / named parameters; the rest frozen). Both export `model/`.

  configs   the recipe configs and their registration (torch-free)
  model     `apply_full`, `apply_freeze` and the model export
"""
