"""peftune/compat.py: one test per use of a dependency's private API. A failure here after an
upgrade means the private API changed: read the new version's source, update the function in
compat.py and the version its docstring names."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

from peftune import compat

# ---- accelerate -----------------------------------------------------------------------------


def test_accelerate_process_state_exists_is_false_then_true():
    """`PartialState._shared_state`: empty in a fresh process, filled by PartialState()."""
    script = (
        "from accelerate.state import PartialState\n"
        "from peftune.compat import accelerate_process_state_exists\n"
        "assert isinstance(PartialState._shared_state, dict), type(PartialState._shared_state)\n"
        "assert accelerate_process_state_exists() is False\n"
        "PartialState(cpu=True)\n"
        "assert accelerate_process_state_exists() is True\n"
        "PartialState()  # a second one shares the first one's state\n"
        "assert accelerate_process_state_exists() is True\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env={k: v for k, v in os.environ.items()
                                              if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
    assert result.returncode == 0, result.stderr[-3000:]


def test_accelerator_mixed_precision_reads_the_accelerator_state():
    """`AcceleratorState._shared_state["_mixed_precision"]`: the precision of the process's
    Accelerator, absent once the state is reset."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    assert isinstance(AcceleratorState._shared_state, dict)
    compat.reset_accelerator_state()  # whatever an earlier test left
    assert compat.accelerator_mixed_precision() is None
    Accelerator(cpu=True, mixed_precision="no")
    assert "_mixed_precision" in AcceleratorState._shared_state
    assert compat.accelerator_mixed_precision() == "no"


def test_reset_accelerator_state_keeps_the_process_state():
    """`AcceleratorState._reset_state(reset_partial_state=False)`: the precision is forgotten,
    the process state (the process group) is kept, and a new Accelerator may be made."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    assert "reset_partial_state" in inspect.signature(AcceleratorState._reset_state).parameters
    compat.reset_accelerator_state()
    Accelerator(cpu=True, mixed_precision="no")
    compat.reset_accelerator_state()
    assert compat.accelerator_mixed_precision() is None
    assert compat.accelerate_process_state_exists()
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    assert str(accelerator.mixed_precision) == "no"


# ---- torch ----------------------------------------------------------------------------------


def test_torchrun_launch_parses_torchrun_flags_into_a_launch_config(monkeypatch):
    """`torch.distributed.run.get_args_parser` / `config_from_args`: torchrun's flags give a
    LaunchConfig and the Python command each process runs."""
    from torch.distributed.launcher.api import LaunchConfig

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # else config_from_args sets it for the process
    config, entrypoint, args = compat.torchrun_launch([
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--rdzv-id", "abc",
        "--nnodes", "1", "--nproc-per-node", "2", "-m", "peftune.cli", "train", "r.yaml",
        "train.lr=1e-4"])
    assert isinstance(config, LaunchConfig)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (1, 1, 2)
    assert (config.rdzv_backend, config.rdzv_endpoint, config.run_id) == ("c10d", "localhost:0",
                                                                          "abc")
    assert entrypoint == sys.executable
    assert args[-5:] == ["-m", "peftune.cli", "train", "r.yaml", "train.lr=1e-4"]


# ---- peft -----------------------------------------------------------------------------------


def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64))


def test_lora_factors_and_adapter_config_read_the_default_adapter():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    assert compat.adapter_config(model).r == 4
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    r, scaling, a, b = compat.lora_factors(layer)
    assert (r, scaling) == (4, 2.0)
    assert tuple(a.shape) == (4, 32) and tuple(b.shape) == (32, 4) and a.requires_grad


def test_lora_4bit_layers_finds_lora_over_bitsandbytes_4bit(tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model

    from peftune.models import load_model
    from peftune.recipe.schema import ModelSection, QuantSection

    model = load_model(ModelSection(path=str(tiny_model_dir)), QuantSection(method="nf4"),
                       device=torch.device("cpu"))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    names = [name for name, _ in compat.lora_4bit_layers(model)]
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)


def test_adalora_allocator_and_trained_config():
    from peft import AdaLoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, tinit=1, tfinal=1, target_modules=["q_proj"]))
    tuner = model.base_model
    allocator = compat.adalora_allocator(tuner)
    for attr in compat.ADALORA_ALLOCATOR_STATE:
        assert isinstance(getattr(allocator, attr), dict), attr
    assert hasattr(compat.adalora_trained_config(tuner), "rank_pattern")


def test_corda_config_and_its_preprocessing_pass():
    from peft import LoraConfig
    from peft.tuners.lora.corda import preprocess_corda

    config = compat.corda_config("kpm")
    assert config.corda_method == "kpm"
    LoraConfig(r=4, init_lora_weights="corda", corda_config=config)  # accepted by peft
    assert "run_model" in inspect.signature(preprocess_corda).parameters


def test_pattern_key_follows_peft_matching():
    assert compat.pattern_key(["q_proj", "layers.1.v_proj"], "model.layers.1.v_proj") == \
        "layers.1.v_proj"
    assert compat.pattern_key(["q_proj"], "model.layers.0.self_attn.q_proj") == "q_proj"


def test_dequantize_bnb_gives_back_a_4bit_weight():
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    quantized = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4",
                                  compute_dtype=torch.float32)
    quantized.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                         quant_type="nf4")
    quantized = quantized.to("cpu")  # quantizes
    weight = compat.dequantize_bnb(quantized.weight).float()
    assert weight.shape == (32, 64)
    error = (weight - linear.weight.detach()).norm() / linear.weight.detach().norm()
    assert float(error) < 0.2


# ---- typer / click --------------------------------------------------------------------------


def test_click_exception_class_is_what_a_bad_flag_raises():
    import typer

    cls = compat.click_exception_class()
    assert issubclass(typer.BadParameter, cls) and cls.__name__ == "ClickException"
    app = typer.Typer()

    @app.command()
    def one(count: int = 1) -> None:
        pass

    try:
        app(["--count", "x"], standalone_mode=False)
    except Exception as err:  # noqa: BLE001 - the point is which class it is
        assert isinstance(err, cls)
    else:
        raise AssertionError("a bad flag value raised nothing")


# ---- quarantine -----------------------------------------------------------------------------

# What only compat.py may touch: private modules and attributes of the libraries above.
PRIVATE = ("from peft.tuners", "from peft.utils", "import peft.utils", "_shared_state",
           "_reset_state", "rankallocator", "trainable_adapter_name", '["default"]',
           "torch.distributed.run import", "__mro__", "._name_or_path", "typer._click",
           "support_avx512bf16_for_cpu")


def test_private_apis_are_used_only_in_compat():
    from pathlib import Path

    import peftune

    root = Path(peftune.__file__).parent
    found = [f"{path.relative_to(root.parent)}:{number}: {needle}"
             for path in sorted(root.rglob("*.py")) if path.name != "compat.py"
             for number, line in enumerate(path.read_text().splitlines(), 1)
             for needle in PRIVATE if needle in line]
    assert not found, "private APIs outside peftune/compat.py:\n" + "\n".join(found)
