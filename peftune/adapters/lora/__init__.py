"""The LoRA family, trained through peft's `LoraConfig`: LoRA, rsLoRA, DoRA and the inits
that set the adapter from the weights or from calibration data (PiSSA, OLoRA, CorDA, EVA,
LoRA-GA, LoftQ).

  configs   the recipe configs and their registration (torch-free)
  model     `apply_lora` and the exports (plain LoRA for the inits that rewrite W)
  loftq     LoftQ's initialisation over a bitsandbytes 4-bit base, on any device
"""
