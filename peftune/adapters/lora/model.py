"""The LoRA family through peft: LoRA, rsLoRA, DoRA and the data- or weight-driven inits
(PiSSA, OLoRA, CorDA, EVA, LoRA-GA, LoftQ); the configs in `configs.py` name the papers.

Inits that rewrite the frozen weight (PiSSA, OLoRA, CorDA, LoRA-GA: W -> W - B0·A0) keep a
copy of their initial adapter, and the export converts the trained adapter into a plain
LoRA of rank 2r that applies to the *original* base (peft's
`path_initial_model_for_weight_conversion`), so any tool can load it.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from peftune import compat
from peftune.adapters.common import load_trainable_state, save_with_tokenizer, trainable_state
from peftune.adapters.hooks import AdapterHooks
from peftune.adapters.lora.configs import (
    CordaConfig,
    EvaConfig,
    LoftqConfig,
    LoraConfig,
    LoraGaConfig,
)
from peftune.adapters.targets import peft_targets
from peftune.errors import InputError


def apply_lora(model: Any, config: LoraConfig, *,
               calibration_batches: Callable[[Any], list[dict]] | None = None,
               model_path: str | None = None, **_: Any) -> tuple[Any, AdapterHooks]:
    from peft import get_peft_model

    peft_config = config.peft_config()
    peft_config.target_modules = peft_targets(model, config)
    started = time.perf_counter()
    report: dict[str, Any] = {}
    batches: list[dict] = []
    if config.calibrated:
        if calibration_batches is None:
            raise InputError(f"adapter.method {config.method} needs calibration data "
                             "(adapter.calibration)")
        batches = calibration_batches(config.calibration)
        report["calibration_examples"] = sum(len(b["input_ids"]) for b in batches)
    if isinstance(config, CordaConfig):
        from peftune.adapters.calibration import forward_each_example

        compat.corda_preprocess(model, peft_config,
                                run_model=lambda: forward_each_example(model, batches))
    if isinstance(config, LoraGaConfig):
        from peft import preprocess_loraga

        from peftune.adapters.calibration import accumulate_gradients

        preprocess_loraga(model, peft_config, train_step=lambda: accumulate_gradients(model, batches))
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as err:  # peft's own checks
        raise InputError(f"adapter: {config.method}: {str(err).splitlines()[0]}") from err
    if isinstance(config, EvaConfig):
        from peft import initialize_lora_eva_weights

        from peftune.adapters.calibration import on_device

        initialize_lora_eva_weights(peft_model, dataloader=on_device(peft_model, batches),
                                    show_progress_bar=False)
        ranks = sorted({int(r) for r in compat.adapter_config(peft_model).rank_pattern.values()})
        report["eva_ranks"] = f"{ranks[0]}..{ranks[-1]}" if ranks else str(config.r)
    if isinstance(config, LoftqConfig):
        from peftune.adapters.lora.loftq import loftq_initialise

        if model_path is None:
            raise InputError("adapter.method loftq needs the base model's local weights")
        report.update(loftq_initialise(peft_model, model_path))
    if config.init_lora_weights() is not True:  # a data- or weight-driven init: say what it cost
        report["init_seconds"] = round(time.perf_counter() - started, 3)

    export = export_peft_adapter
    if config.rewrites_base:
        initial = _save_initial_adapter(peft_model)

        def export(model: Any, out_dir: Path, tokenizer: Any = None) -> None:
            export_residual_as_lora(model, out_dir, tokenizer, initial=initial)

    return peft_model, AdapterHooks(
        export=export,
        trainable_state=trainable_state,
        load_trainable_state=load_trainable_state,
        init_report=report,
    )


def export_peft_adapter(model: Any, out_dir: Path, tokenizer: Any = None) -> None:
    """Write `out_dir` as a PEFT adapter directory (config + safetensors, tokenizer beside).

    The config says `init_lora_weights: true`: the trained weights are the adapter, so a
    loader must not re-run a data-driven init (EVA) that it has no data for."""
    with _plain_init(model):
        save_with_tokenizer(model, out_dir, tokenizer)


def export_residual_as_lora(model: Any, out_dir: Path, tokenizer: Any = None, *,
                            initial: Any) -> None:
    """A plain LoRA on the original base: [B, -B0]·[A; A0] (rank 2r, alpha doubled)."""
    model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False,
                          path_initial_model_for_weight_conversion=str(Path(initial.name) / "initial"))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def _save_initial_adapter(peft_model: Any) -> tempfile.TemporaryDirectory:
    """The adapter as initialised, saved as a plain init (the conversion's reference)."""
    held = tempfile.TemporaryDirectory(prefix="peftune-initial-adapter-")
    with _plain_init(peft_model):  # loaded back as is, not re-derived from the base
        peft_model.save_pretrained(Path(held.name) / "initial", safe_serialization=True)
    return held


@contextlib.contextmanager
def _plain_init(peft_model: Any) -> Iterator[None]:
    config = compat.adapter_config(peft_model)
    init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        yield
    finally:
        config.init_lora_weights = init
