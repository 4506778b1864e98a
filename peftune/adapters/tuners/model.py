"""peft's tuners other than the LoRA family, applied from their recipe configs (the
virtual-token methods of `peftune.adapters.prompt` too).

Method-specific training behaviour reaches the loop only through hooks: AdaLoRA's rank
allocation after each optimizer step and its orthogonality penalty as an extra loss.
Poly's router needs task ids; every row is task 0 until data rows carry task ids.
"""

from __future__ import annotations

from typing import Any

from peftune import compat
from peftune.adapters.common import load_trainable_state, save_with_tokenizer, trainable_state
from peftune.adapters.hooks import AdapterHooks
from peftune.adapters.targets import peft_targets
from peftune.adapters.tuners.configs import AdaLoraConfig
from peftune.adapters.tuners.product_configs import PolyConfig
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
    hooks = AdapterHooks(export=save_with_tokenizer, trainable_state=trainable_state,
                         load_trainable_state=load_trainable_state)
    if isinstance(config, AdaLoraConfig):
        hooks.trainable_state, hooks.load_trainable_state = adalora_state, load_adalora_state
        hooks.after_step.append(adalora_allocate)
        if config.orth_reg_weight > 0:
            hooks.extra_loss = adalora_orthogonality(config.orth_reg_weight)
    if isinstance(config, PolyConfig):
        peft_model.register_forward_pre_hook(_single_task_ids, with_kwargs=True)
    return peft_model, hooks


def adalora_allocate(model: Any, step: int) -> None:
    """AdaLoRA's importance update and budget masking; needs this step's gradients."""
    getattr(model, "module", model).base_model.update_and_allocate(step)


def adalora_state(model: Any) -> dict:
    """The trained tensors plus what AdaLoRA's allocation carries from step to step: the
    importance averages and, once set, the final rank pattern."""
    import torch

    state = trainable_state(model)
    tuner = model.base_model
    for attr in compat.ADALORA_ALLOCATOR_STATE:
        for name, tensor in getattr(compat.adalora_allocator(tuner), attr).items():
            state[f"adalora.{attr}.{name}"] = tensor.detach().to("cpu", copy=True)
    for name, mask in (compat.adalora_trained_config(tuner).rank_pattern or {}).items():
        state[f"adalora.rank_pattern.{name}"] = torch.tensor(mask)
    return state


def load_adalora_state(model: Any, state: dict) -> None:
    tuner = model.base_model
    device = next(model.parameters()).device
    ours = {k: v for k, v in state.items() if k.startswith("adalora.")}
    load_trainable_state(model, {k: v for k, v in state.items() if k not in ours})
    for attr in compat.ADALORA_ALLOCATOR_STATE:
        prefix = f"adalora.{attr}."
        setattr(compat.adalora_allocator(tuner), attr, {k[len(prefix):]: v.to(device) for k, v in ours.items()
                                            if k.startswith(prefix)})
    pattern = {k[len("adalora.rank_pattern."):]: v.tolist() for k, v in ours.items()
               if k.startswith("adalora.rank_pattern.")}
    compat.adalora_trained_config(tuner).rank_pattern = pattern or None


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
