"""peft's tuners other than the LoRA family, applied from their recipe configs.

Method-specific training behaviour reaches the loop only through hooks: AdaLoRA's rank
allocation after each optimizer step and its orthogonality penalty as an extra loss.
Poly's router needs task ids; every row is task 0 until data rows carry task ids.
"""

from __future__ import annotations

from typing import Any

from peftune.adapters.common import load_trainable_state, save_with_tokenizer, trainable_state
from peftune.adapters.hooks import AdapterHooks
from peftune.adapters.targets import peft_targets
from peftune.adapters.tuner_configs import AdaLoraConfig, PolyConfig
from peftune.errors import InputError


def apply_tuner(model: Any, config: Any, *, tokenizer: Any = None,
                total_steps: int | None = None, **_: Any) -> tuple[Any, AdapterHooks]:
    from peft import get_peft_model

    peft_config = config.peft_config(total_steps=total_steps, tokenizer=tokenizer)
    if config.targets is not None:
        peft_config.target_modules = peft_targets(model, config)
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as err:  # peft's own shape checks, e.g. a block size that does not fit
        raise InputError(f"adapter: {config.method}: {str(err).splitlines()[0]}") from err
    hooks = AdapterHooks(export=export_peft_adapter, trainable_state=trainable_state,
                         load_trainable_state=load_trainable_state)
    if isinstance(config, AdaLoraConfig):
        hooks.after_step.append(adalora_allocate)
        if config.orth_reg_weight > 0:
            hooks.extra_loss = adalora_orthogonality(config.orth_reg_weight)
    if isinstance(config, PolyConfig):
        peft_model.register_forward_pre_hook(_single_task_ids, with_kwargs=True)
    return peft_model, hooks


def export_peft_adapter(model: Any, out_dir: Any, tokenizer: Any = None) -> None:
    """Write `out_dir` as a PEFT adapter directory (config + safetensors, tokenizer beside)."""
    save_with_tokenizer(model, out_dir, tokenizer)


def adalora_allocate(model: Any, step: int) -> None:
    """AdaLoRA's importance update and budget masking; needs this step's gradients."""
    getattr(model, "module", model).base_model.update_and_allocate(step)


def adalora_orthogonality(weight: float) -> Any:
    """AdaLoRA's regulariser: weight x mean over P and Q of ‖PPᵀ - I‖_F (‖QᵀQ - I‖_F),
    the term peft adds only when the model computes the loss from labels itself."""
    import torch

    def extra_loss(model: Any) -> Any:
        terms = []
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_A" in name or "lora_B" in name):
                gram = param @ param.T if "lora_A" in name else param.T @ param
                eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
                terms.append(torch.linalg.matrix_norm(gram - eye))
        return weight * torch.stack(terms).mean()

    return extra_loss


def _single_task_ids(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    import torch

    if kwargs.get("task_ids") is None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        kwargs["task_ids"] = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    return args, kwargs
