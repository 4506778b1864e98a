"""Private APIs of our dependencies, each with the version it was checked against.

Every use peftune makes of a library's private (underscored or undocumented) API is a small
function here, its docstring naming the library version it was checked against; the rest of
peftune calls these functions, never the private names. `tests/test_compat.py` has a test per
function that fails loudly when an upgrade removes or changes what it relies on: when one
fails, check the new version's source and update the function (and the version it names).

Grouped by library. Importing this module imports none of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# ---- accelerate ---------------------------------------------------------------------------
# Accelerate keeps its state in process-wide singletons (a "Borg" pattern): every
# PartialState() / AcceleratorState() shares the class attribute `_shared_state`, a dict that
# is empty until the first one is created.


def accelerate_process_state_exists() -> bool:
    """Whether Accelerate's process state (`PartialState`, which holds the process group) has
    been created in this process: `PartialState._shared_state` is non-empty.

    Checked against accelerate 1.16.0."""
    from accelerate.state import PartialState

    return bool(PartialState._shared_state)


def accelerator_mixed_precision() -> str | None:
    """The mixed-precision mode ("no", "bf16", "fp16", ...) held by Accelerate's process-wide
    `AcceleratorState`, or None before the first Accelerator of this process (or after
    `reset_accelerator_state`): `AcceleratorState._shared_state["_mixed_precision"]`, a
    PrecisionType (a str enum) or a str.

    Checked against accelerate 1.16.0."""
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    return getattr(current, "value", current)


def reset_accelerator_state() -> None:
    """Forget the per-run part of Accelerate's state (precision, plugins) and keep the process
    part (`PartialState`, the process group), so that the next Accelerator of this process may
    ask for another precision: `AcceleratorState._reset_state(reset_partial_state=False)`.

    Checked against accelerate 1.16.0."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


# ---- torch --------------------------------------------------------------------------------


def torchrun_launch(argv: Sequence[str]) -> tuple[Any, Any, list[str]]:
    """What `torchrun ARGV` would launch: (LaunchConfig, entrypoint, its arguments), for
    `torch.distributed.launcher.api.elastic_launch`. torchrun's own argument parser and its
    conversion to a launch config (`torch.distributed.run.get_args_parser`,
    `config_from_args`) are not part of torch's documented API.

    Checked against torch 2.13.0."""
    from torch.distributed.run import config_from_args, get_args_parser

    config, entrypoint, args = config_from_args(get_args_parser().parse_args(list(argv)))
    return config, entrypoint, list(args)


# ---- peft ---------------------------------------------------------------------------------
# peft's layers keep one entry per adapter name in dicts (`lora_A["default"]`); peftune trains
# one adapter, named "default". AdaLoRA's budget allocator is an attribute of its tuner.

ADAPTER = "default"  # the adapter name get_peft_model gives the one adapter peftune trains


def corda_config(mode: str) -> Any:
    """peft's CordaConfig (`corda_method=mode`), which peft does not export at its top level:
    `peft.tuners.lora.config.CordaConfig`.

    Checked against peft 0.21.2."""
    from peft.tuners.lora.config import CordaConfig

    return CordaConfig(corda_method=mode, verbose=False)


def corda_preprocess(model: Any, peft_config: Any, run_model: Any) -> None:
    """CorDA's covariance pass over calibration data, before `get_peft_model`:
    `peft.tuners.lora.corda.preprocess_corda` (not exported at peft's top level).

    Checked against peft 0.21.2."""
    from peft.tuners.lora.corda import preprocess_corda

    preprocess_corda(model, peft_config, run_model=run_model)


def lora_4bit_layers(model: Any) -> Any:
    """(name, layer) for every LoRA layer over a bitsandbytes 4-bit base that holds the
    adapter: instances of `peft.tuners.lora.bnb.Linear4bit`.

    Checked against peft 0.21.2."""
    from peft.tuners.lora.bnb import Linear4bit

    for name, module in model.named_modules():
        if isinstance(module, Linear4bit) and ADAPTER in module.lora_A:
            yield name, module


def lora_layers(model: Any) -> Any:
    """(name, layer) for every LoRA layer of `model` that holds the adapter: instances of
    `peft.tuners.lora.LoraLayer` (over any base layer, quantized or not).

    Checked against peft 0.21.2."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            yield name, module


def lora_factors(layer: Any) -> tuple[int, float, Any, Any]:
    """A LoRA layer's rank, scaling and the weights of A and B (trainable parameters):
    `layer.r[name]`, `layer.scaling[name]`, `layer.lora_A[name].weight`, `lora_B[...]`.

    Checked against peft 0.21.2."""
    return (layer.r[ADAPTER], layer.scaling[ADAPTER], layer.lora_A[ADAPTER].weight,
            layer.lora_B[ADAPTER].weight)


def adapter_config(peft_model: Any) -> Any:
    """The config of the one adapter of a PeftModel (`peft_config["default"]`)."""
    return peft_model.peft_config[ADAPTER]


# AdaLoRA's RankAllocator keeps its importance averages in these dict attributes.
ADALORA_ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def adalora_allocator(tuner: Any) -> Any:
    """AdaLoRA's budget allocator (`AdaLoraModel.rankallocator`), whose dicts
    `ADALORA_ALLOCATOR_STATE` carry the importance scores from step to step.

    Checked against peft 0.21.2."""
    return tuner.rankallocator


def adalora_trained_config(tuner: Any) -> Any:
    """The config of the adapter AdaLoRA trains (`tuner.peft_config[tuner.trainable_adapter_name]`),
    whose `rank_pattern` holds the final rank masks once allocation has ended.

    Checked against peft 0.21.2."""
    return tuner.peft_config[tuner.trainable_adapter_name]


def pattern_key(patterns: Any, module: str) -> str:
    """The key of `rank_pattern` / `alpha_pattern` that applies to `module`, by peft's own
    matching rule: `peft.utils.other.get_pattern_key`.

    Checked against peft 0.21.2."""
    from peft.utils.other import get_pattern_key

    return get_pattern_key(patterns, module)


def preload_pattern_matching() -> None:
    """Import what `pattern_key` needs now (peft is slow to import; a streaming merge imports
    it before its prefetch thread starts importing transformers)."""
    import peft.utils.other  # noqa: F401


def dequantize_bnb(weight: Any, state: Any = None) -> Any:
    """A bitsandbytes 4-bit or 8-bit weight as a float tensor:
    `peft.utils.integrations.dequantize_bnb_weight`.

    Checked against peft 0.21.2."""
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(weight, state=state)


# ---- bitsandbytes -------------------------------------------------------------------------


def disable_bnb_cpu_bf16_repacking(module: Any) -> None:
    """Turn off a bitsandbytes 4-bit layer's CPU weight repacking for AVX512-BF16 kernels
    (`Linear4bit.support_avx512bf16_for_cpu`). On CPUs with avx512_bf16 the repacking,
    done at the first eval-mode forward, leaves the weight in a layout that later training
    steps read wrongly: LoRA gradients over the base are silently corrupted, and a merge
    into the layer's weight reads garbage. A layer without the attribute is left alone.

    Checked against bitsandbytes 0.50.2."""
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False


# ---- typer / click ------------------------------------------------------------------------


def click_exception_class() -> type[Exception]:
    """Click's base exception, which Typer raises for a bad flag or argument under
    `standalone_mode=False`. Typer 0.29 vendors Click (`typer._click`) and exports only
    `BadParameter`, a subclass: the class is found on its MRO by name.

    Checked against typer 0.29.2."""
    import typer

    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
