"""peft's tuners other than the LoRA family, applied through peft.

  configs           `TunerConfig` and AdaLoRA, VeRA, VB-LoRA, RandLoRA, MiSS / Bone, SHiRA,
                    (IA)³; `register_tuner` (torch-free)
  product_configs   LoKr, LoHa (products), OFT, BOFT, HRA (rotations), Poly, MHR (routed)
  model             `apply_tuner` (also for the virtual-token methods) and AdaLoRA's hooks
"""
