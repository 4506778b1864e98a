"""Virtual-token methods through peft: prompt tuning, prefix tuning and P-tuning.

  configs   the recipe configs and their registration (torch-free); they are applied by
            `peftune.adapters.tuners.model:apply_tuner`, as peft's other tuners
"""
