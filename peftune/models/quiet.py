"""Quieting the libraries underneath before they load: every model loader (`loading`,
the GGUF conversion, the tiny-model builder, merge) calls `quiet_libraries` first."""

from __future__ import annotations


def quiet_libraries() -> None:
    """No per-tensor loading bars, advisory warnings or optional-kernel notices from the
    libraries underneath: peftune prints its own progress, and these say nothing actionable.
    Call before importing peft or bitsandbytes."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # bitsandbytes on CPU logs that the optional `kernels` package is absent (it must stay
    # absent: it downloads kernels from the hub), and transformers' deprecation notices
    # triggered inside peft are not the user's to fix.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # peft on a LoRA over a tied lm_head: peftune adapts the head alone on purpose, exports
    # only the factors, and `peftune merge` unties the head (validate says so)
    warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*")
    # PiSSA / OLoRA / CorDA: peftune exports them as a plain LoRA on the original base
    # (export_residual_as_lora), which is what this warning asks the user to do
    warnings.filterwarnings("ignore", message=".*changes the base weights of the model.*")
