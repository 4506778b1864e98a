"""quant.method: int4 (HQQ 4-bit integer weights): real 4-bit storage, deterministic
quantizing, LoRA (and DoRA) training through peft, exact adapter export and merge, the
eval-pass gradient check, and recipe validation of the int4 keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    IDS,
    NO_DEBUG,
    TARGETS,
    assert_eval_forward_keeps_gradients,
    logits_of,
    read_metrics,
    run_cli,
    run_python,
    train_in_process,
    write_recipe,
)

from peftune.errors import InputError
from peftune.recipe import load_recipe, recipe_to_yaml
from peftune.recipe.schema import ModelSection, QuantSection

CPU = torch.device("cpu")
# The tiny model's hidden size is 32, so the default group (64) does not divide its q/k/v/o
# and gate/up inputs; 32 does (and down_proj's 64).
INT4 = {"method": "int4", "group_size": 32, "compute_dtype": "float32"}


def _int4_model(model_dir: Path, **quant):
    from peftune.models import load_model

    return load_model(ModelSection(path=str(model_dir)), QuantSection(**{**INT4, **quant}),
                      device=CPU).eval()


def _int4_layers(model) -> dict:
    from peftune.quant.hqq import is_int4_layer

    return {name: module for name, module in model.named_modules() if is_int4_layer(module)}


def test_int4_stores_real_4bit_codes_deterministically_and_close_to_the_weights(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    dense = {name: m.weight.detach() for name, m in reference.named_modules()
             if isinstance(m, torch.nn.Linear)}
    model = _int4_model(tiny_model_dir)
    layers = _int4_layers(model)
    assert sorted(layers) == sorted(name for name in dense if name != "lm_head")
    assert isinstance(model.lm_head, torch.nn.Linear)  # the head stays full precision
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules()
                   if n != "lm_head")

    stored = dense_bytes = 0
    for name, layer in layers.items():
        out_f, in_f = dense[name].shape
        assert layer.meta["nbits"] == 4 and layer.meta["packing"] == "4bit_u8"
        assert layer.meta["group_size"] == 32 and layer.meta["axis"] == 1
        # two 4-bit codes per byte, and each code uses the whole 0..15 range
        assert layer.W_q.dtype == torch.uint8 and layer.W_q.numel() * 2 == out_f * in_f
        codes = layer.unpack(dtype=torch.float32)
        assert codes.min() == 0 and codes.max() == 15 and len(codes.unique()) == 16
        scale = layer.meta["scale"]
        assert scale.numel() == out_f * in_f // 32  # one scale (and zero) per group of 32
        stored += layer.W_q.numel() + 2 * scale.numel() * scale.element_size()
        dense_bytes += dense[name].numel() * 4
        # each weight within one quantization step of its original (optimized zeros may
        # move a weight off its nearest level, never by a whole step)
        error = (layer.dequantize() - dense[name]).abs().reshape(-1, 32)
        assert (error <= scale.reshape(-1, 1) * 1.0).all(), name
    assert stored * 5 < dense_bytes  # 4 bits + two fp32 numbers per 32 weights: 5.3x less

    # A pure function of the weights: loading again gives identical codes, scales, zeros.
    again = _int4_layers(_int4_model(tiny_model_dir))
    for name, layer in layers.items():
        assert torch.equal(layer.W_q, again[name].W_q)
        assert torch.equal(layer.meta["scale"], again[name].meta["scale"])
        assert torch.equal(layer.meta["zero"], again[name].meta["zero"])
    # and the 4-bit model is close to the original one, not equal
    gap = (logits_of(model) - logits_of(reference)).abs().max()
    assert 1e-4 < gap < 0.2 * logits_of(reference).abs().max()


def test_a_group_size_that_does_not_divide_a_layer_fails_before_quantizing(tiny_model_dir):
    with pytest.raises(InputError) as err:
        _int4_model(tiny_model_dir, group_size=64)
    assert str(err.value) == (
        "quant.group_size: 64 does not divide the input size 32 of model.layers.0.self_attn."
        "q_proj (12 layers); use a group size that divides it, such as 32")


def test_bf16_compute_runs_a_fp32_model_and_returns_fp32(tiny_model_dir):
    fp32 = logits_of(_int4_model(tiny_model_dir))
    model = _int4_model(tiny_model_dir, compute_dtype="bfloat16")
    assert next(iter(_int4_layers(model).values())).meta["scale"].dtype == torch.bfloat16
    bf16 = logits_of(model)
    assert bf16.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: about 1% of the logits' size, far above fp32's rounding
    scale = fp32.abs().max()
    assert 1e-6 < (bf16 - fp32).abs().max() < 0.05 * scale


def test_lora_trains_over_int4_and_the_adapter_reproduces_and_merges_exactly(
        tmp_path, tiny_model_dir, text_data):
    from peft import PeftModel

    from peftune.quant.hqq import dequantize_int4

    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run", quant=INT4,
                          adapter={"method": "lora", "r": 4, "alpha": 8, "target_modules": TARGETS},
                          train={"max_steps": 12})
    built, summary = train_in_process(recipe)
    records = read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.1
    # r·(in + out) per layer: q, k, v, o, gate, up, down, in 2 layers
    assert summary["trainable_params"] == 2 * 4 * (64 + 48 + 48 + 64 + 96 + 96 + 96)

    trained = built.unwrapped_model.eval()
    assert len(_int4_layers(trained)) == 14  # trained over the 4-bit base
    expected = logits_of(trained)
    adapter = tmp_path / "run" / "adapter"
    # The adapter on a freshly quantized base: the same codes, so the same logits.
    loaded = PeftModel.from_pretrained(_int4_model(tiny_model_dir), adapter).eval()
    torch.testing.assert_close(logits_of(loaded), expected, rtol=0, atol=1e-5)
    base_effect = (logits_of(_int4_model(tiny_model_dir)) - expected).abs().max()
    assert base_effect > 0.05  # the adapter changed the model well beyond the tolerances

    # Merge into the dequantized base: exactly the weights training saw, plus s·B·A. The
    # merged and unmerged forms differ only in fp32 summation order (measured 2e-7 on
    # logits of size ~1; fp32 epsilon is 1.2e-7), so 1e-5 is a 50x margin.
    dequantized = dequantize_int4(_int4_model(tiny_model_dir), dtype=torch.float32)
    assert not _int4_layers(dequantized)
    merged = PeftModel.from_pretrained(dequantized, adapter).merge_and_unload().eval()
    assert not any("lora" in name for name, _ in merged.named_modules())
    torch.testing.assert_close(logits_of(merged), expected, rtol=0, atol=1e-5)


def test_gradient_checkpointing_over_int4_gives_the_same_losses(tmp_path, tiny_model_dir,
                                                                text_data):
    losses = []
    for checkpointing in (False, True):
        out = tmp_path / f"run-{checkpointing}"
        recipe = write_recipe(tmp_path / f"{checkpointing}.yaml", model=tiny_model_dir,
                              data=text_data["train"], out=out, quant=INT4,
                              adapter={"method": "lora", "r": 4, "alpha": 8,
                                       "target_modules": TARGETS},
                              train={"max_steps": 4, "gradient_checkpointing": checkpointing})
        train_in_process(recipe)
        losses.append([r["loss"] for r in read_metrics(out) if "loss" in r])
    assert len(losses[0]) == 4 and losses[0][-1] != losses[0][0]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_lora_and_dora_over_int4_train_export_and_merge(tmp_path, tiny_model_dir, use_dora):
    """The peft types peftune can offer over int4 (others refuse HQQ layers or need .weight)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from peftune.quant.hqq import dequantize_int4

    torch.manual_seed(0)
    model = get_peft_model(_int4_model(tiny_model_dir), LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, use_dora=use_dora))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    expected = logits_of(model.eval())
    model.save_pretrained(tmp_path / "adapter")
    dequantized = dequantize_int4(_int4_model(tiny_model_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(dequantized, tmp_path / "adapter").merge_and_unload()
    torch.testing.assert_close(logits_of(merged.eval()), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_an_eval_pass_on_an_int4_base_leaves_the_next_gradients_unchanged(
        tmp_path, tiny_model_dir, text_data, compute_dtype):
    """bitsandbytes repacks its 4-bit weights on the first eval forward on AVX512-BF16 CPUs,
    corrupting later LoRA gradients; an HQQ layer must keep computing the same gradients."""
    from peftune.adapters import apply_adapter
    from peftune.models import load_model

    recipe = load_recipe(write_recipe(
        tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"], out=tmp_path / "run",
        quant={**INT4, "compute_dtype": compute_dtype},
        adapter={"method": "lora", "r": 4, "alpha": 8, "target_modules": TARGETS}))
    torch.manual_seed(0)
    model = load_model(recipe.model, recipe.quant, device=CPU)
    model, _ = apply_adapter(model, recipe.adapter)
    before = assert_eval_forward_keeps_gradients(model)
    assert len(before) == 2 * 14 and all(g.abs().sum() > 0 for g in before.values())


def test_all_linear_reaches_the_int4_layers(tiny_model_dir):
    """peft's own `all-linear` collects nn.Linear layers, which HQQ layers are not; peftune
    names the layers for it, so the default target_modules works over int4."""
    from peft import LoraConfig, get_peft_model

    from peftune.adapters import apply_adapter
    from peftune.adapters.specs import LoraConfig as Recipe

    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(_int4_model(tiny_model_dir), LoraConfig(r=2, target_modules="all-linear"))
    model, _ = apply_adapter(_int4_model(tiny_model_dir), Recipe(r=2))
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters()
               if "lora_A" in name}
    assert adapted == set(TARGETS)


# ---- recipe keys -------------------------------------------------------------------------

def test_int4_defaults_resolve_and_the_resolved_recipe_loads_back(tmp_path, tiny_model_dir,
                                                                   text_data):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", model=tiny_model_dir,
                                      data=text_data["train"], out=tmp_path / "run",
                                      quant={"method": "int4"}))
    assert (recipe.quant.group_size, recipe.quant.double_quant) == (64, False)
    saved = tmp_path / "resolved.yaml"
    saved.write_text(recipe_to_yaml(recipe))
    assert load_recipe(saved) == recipe
    nf4 = load_recipe(tmp_path / "r.yaml", ["quant.method=nf4"])
    assert (nf4.quant.group_size, nf4.quant.double_quant) == (None, True)


@pytest.mark.parametrize(("quant", "expected"), [
    ({"method": "nf4", "group_size": 32},
     "quant.group_size: applies only to quant.method: int4, not nf4; remove it or use "
     "quant.method: int4, got 32"),
    ({"method": "int4", "group_size": 12}, "quant.group_size: should be a multiple of 8, got 12"),
    ({"method": "int4", "group_size": 0}, "quant.group_size: must be > 0, got 0"),
    ({"method": "int4", "double_quant": True},
     "quant.double_quant: int4 (HQQ) keeps each group's scale and zero unquantized"),
], ids=["group_size-on-nf4", "not-a-multiple-of-8", "zero", "double_quant"])
def test_bad_int4_keys_fail_validation_in_one_line(tmp_path, tiny_model_dir, text_data, quant,
                                                   expected):
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run", quant=quant)
    result = run_cli("validate", str(recipe), env=NO_DEBUG)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "r.yaml:" in lines[0], result.stderr


def test_importing_the_cli_and_quant_backends_stays_torch_free():
    code = ("import sys, peftune.cli, peftune.quant, peftune.models; "
            "print([m for m in ('torch', 'hqq', 'bitsandbytes') if m in sys.modules])")
    result = run_python(code, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
