"""LoRA (Hu et al. 2021) through peft: W + (alpha/r)·B·A; rsLoRA scales by alpha/sqrt(r).

Exports the standard PEFT adapter directory that `peft.PeftModel.from_pretrained` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftune.adapters.common import load_trainable_state, save_with_tokenizer, trainable_state
from peftune.adapters.hooks import AdapterHooks
from peftune.adapters.specs import LoraConfig


def apply_lora(model: Any, config: LoraConfig, **_: Any) -> tuple[Any, AdapterHooks]:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        use_rslora=config.rslora,
        bias=config.bias,
        modules_to_save=config.modules_to_save,
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as err:  # e.g. target modules that match nothing
        from peftune.errors import InputError

        raise InputError(f"adapter.target_modules: {str(err).splitlines()[0]}") from err
    return peft_model, AdapterHooks(
        export=export_peft_adapter,
        trainable_state=trainable_state,
        load_trainable_state=load_trainable_state,
    )


def export_peft_adapter(model: Any, out_dir: Path, tokenizer: Any = None) -> None:
    """Write `out_dir` as a PEFT adapter directory (config + safetensors, tokenizer beside)."""
    save_with_tokenizer(model, out_dir, tokenizer)
