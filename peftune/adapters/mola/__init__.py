"""MoLA: LoRA experts mixed by a token router, more experts in higher layers.

  configs   the recipe config and its registration (torch-free)
  model     the mixture layer, `apply_mola`, the native export and its loader
"""
