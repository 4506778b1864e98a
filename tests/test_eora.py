"""EoRA (`quant.compensation: eora`, `peftune compensate`): the eigenspace low-rank fit of the
quantization error, the dequantized weights it corrects, the QLoRA init and the command."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import cli_in_process, recipe_refusal, write_jsonl, write_recipe

# ---- the fit: B·A minimises ||(E - B·A)·X||_F -----------------------------------------------


def _anisotropic(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An error matrix and an input covariance whose energy sits in a few directions."""
    gen = torch.Generator().manual_seed(seed)
    error = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64))
    spectrum = torch.logspace(2, -4, cols, dtype=torch.float64)
    return error, (basis * spectrum) @ basis.T


def test_the_fit_reaches_the_optimum_of_the_weighted_problem():
    from peftune.quant.eora import eora_factors, output_energy

    error, cov = _anisotropic(24, 16)
    b, a = eora_factors(error, cov, rank=4, damp=1e-12)
    # the optimum of min ||(E - M)·S||_F over rank-4 M (C = S·Sᵀ) is the tail of E·S's spectrum
    s = torch.linalg.svdvals(error @ torch.linalg.cholesky(cov))
    assert output_energy(error - b @ a, cov) == pytest.approx(float(s[4:].pow(2).sum()), rel=1e-6)
    # and it beats the plain SVD of E (LoftQ's fit) on the same inputs, by far here
    u, sv, vh = torch.linalg.svd(error, full_matrices=False)
    plain = (u[:, :4] * sv[:4]) @ vh[:4]
    assert output_energy(error - b @ a, cov) < 0.5 * output_energy(error - plain, cov)
    # at full rank the error is reproduced
    b, a = eora_factors(error, cov, rank=16, damp=1e-12)
    assert torch.allclose(b @ a, error, atol=1e-6)


def test_damping_bounds_directions_the_inputs_never_take():
    from peftune.quant.eora import eora_factors

    error, cov = _anisotropic(12, 8)
    cov[:, -1] = cov[-1, :] = 0.0  # one input direction never seen
    for damp in (0.01, 0.1):
        b, a = eora_factors(error, cov, rank=3, damp=damp)
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
    # a rank above the layer's keeps the extra factors zero
    b, a = eora_factors(error[:, :2], cov[:2, :2], rank=5, damp=0.01)
    assert b.shape == (12, 5) and a.shape == (5, 2) and not b[:, 2:].any()


# ---- the quantized layers' own weights --------------------------------------------------


@pytest.mark.parametrize("method", ["nf4", "int8", "int4"])
def test_the_dequantized_weight_is_what_the_layer_computes_with(tiny_model_dir, method):
    from peftune.models import load_model
    from peftune.quant.eora import dequantized_weight, is_quantized_linear
    from peftune.recipe.schema import ModelSection, QuantSection

    model = load_model(ModelSection(path=str(tiny_model_dir), dtype="float32"),
                       QuantSection(method=method, compute_dtype="float32",
                                    group_size=32 if method == "int4" else None),
                       device=torch.device("cpu"))
    layer = model.model.layers[0].mlp.down_proj
    assert is_quantized_linear(layer)
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = layer(x).float()
    got = x @ dequantized_weight(layer).T
    # int8 matmuls cast the inputs to fp16 and round the outputs: its tolerance is theirs
    tolerance = 2e-2 if method == "int8" else 1e-5
    assert torch.allclose(got, expected, atol=tolerance * expected.abs().max(), rtol=0)


def test_each_layer_gets_the_covariance_of_its_own_inputs(tiny_model_dir):
    """Layers fed one tensor (q, k, v) share a matrix; no other layer is taken for one of
    them (a freed input's memory reused by a later one must not pass for it)."""
    from peft import LoraConfig, get_peft_model

    from peftune.models import load_model
    from peftune.quant.eora import input_covariances, quantized_lora_layers
    from peftune.recipe.schema import ModelSection, QuantSection

    model = load_model(ModelSection(path=str(tiny_model_dir), dtype="float32"),
                       QuantSection(method="nf4", compute_dtype="float32"),
                       device=torch.device("cpu"))
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    layers = list(quantized_lora_layers(model))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (2, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # padding: not an input
    covariances, tokens = input_covariances(model, layers, [{"input_ids": ids,
                                                             "attention_mask": mask}])
    assert tokens == 28
    inputs: dict[str, list] = {name: [] for name, _ in layers}
    handles = [module.get_base_layer().register_forward_pre_hook(
        lambda _, args, name=name: inputs[name].append(args[0].reshape(-1, args[0].shape[-1])))
        for name, module in layers]
    with torch.no_grad():
        for row, row_mask in zip(ids, mask, strict=True):
            model(input_ids=row[row_mask.bool()][None])
    for handle in handles:
        handle.remove()
    for name, _ in layers:
        x = torch.cat(inputs[name]).double()
        torch.testing.assert_close(covariances[name], x.T @ x / tokens, rtol=1e-9, atol=1e-12)
    q, k = (next(c for n, c in covariances.items() if n.endswith(f"layers.0.self_attn.{p}_proj"))
            for p in "qk")
    assert q is k


# ---- the QLoRA init and `peftune compensate` ------------------------------------------------


@pytest.fixture
def eora_recipe(tmp_path, tiny_model_dir, text_data):
    return write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                        val=text_data["val"], out=tmp_path / "run",
                        quant={"method": "nf4", "compute_dtype": "float32",
                               "compensation": {"name": "eora",
                                                "calibration": {"examples": 16}}},
                        adapter={"method": "lora", "r": 8, "alpha": 16})


def test_compensate_writes_a_run_whose_adapter_brings_the_4bit_model_closer(eora_recipe, tmp_path,
                                                                            tiny_model_dir):
    from peft import PeftModel

    from peftune.models import load_model
    from peftune.recipe.schema import ModelSection, QuantSection
    from tests.conftest import fp32_base, logits_of

    out = tmp_path / "comp"
    result = cli_in_process("compensate", eora_recipe, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "EoRA on" in result.stdout and "held-out ppl" in result.stdout
    report = json.loads((out / "compensation.json").read_text())
    assert report["compensated_layers"] == 14 and report["rank"] == 8
    assert report["calibration_tokens"] > 0 and report["heldout_target_tokens"] > 0
    assert report["output_error_after"] < 0.8 * report["output_error_before"]
    assert report["weight_error_after"] < report["weight_error_before"]
    assert set(report["heldout_ppl"]) == {"unquantized", "quantized", "svd", "compensated"}
    # the eigenspace fit beats the plain SVD of the error on the inputs it was fitted to
    assert report["output_error_after"] < report["output_error_svd"]
    assert report["weight_error_svd"] < report["weight_error_after"]  # which fits the weights
    assert (out / "recipe.yaml").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert not list(tmp_path.glob(".tmp-*"))

    # the adapter, loaded by peft alone over the 4-bit base, moves its logits toward fp32's
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    reference = logits_of(fp32_base(tiny_model_dir), ids)

    def nf4():
        return load_model(ModelSection(path=str(tiny_model_dir), dtype="float32"),
                          QuantSection(method="nf4", compute_dtype="float32"),
                          device=torch.device("cpu"))

    quantized = logits_of(nf4(), ids)
    compensated = logits_of(PeftModel.from_pretrained(nf4(), out / "adapter"), ids)
    before = (quantized - reference).pow(2).mean()
    after = (compensated - reference).pow(2).mean()
    assert after < 0.7 * before, (float(before), float(after))

    # a second time without --overwrite: one line, the result left alone
    again = cli_in_process("compensate", eora_recipe, "--out", out)
    assert again.returncode == 2 and "--overwrite" in again.stderr


@pytest.mark.parametrize("init", ["eora", "loftq"])
def test_a_run_from_the_quantization_error_merges_into_what_it_trained_over(
        eora_recipe, tmp_path, init):
    from transformers import AutoModelForCausalLM

    from tests.conftest import logits_of, train_in_process

    overrides = ["train.max_steps=2"]
    if init == "loftq":  # LoftQ's init: the plain SVD of the same error, no compensation key
        overrides += ["quant.compensation=none", "adapter.method=loftq"]
    built, summary = train_in_process(eora_recipe, overrides)
    init_report = summary["adapter_init"]
    if init == "eora":
        assert init_report["compensation"] == "eora" and init_report["compensated_layers"] == 14
        assert init_report["output_error_after"] < init_report["output_error_before"]
    else:
        assert init_report["quant_error_after"] < init_report["quant_error_before"]
    assert summary["steps"] == 2

    # the adapter belongs to the 4-bit base: merge folds it into the dequantized weights, so
    # the merged model is the trained one (merged into the originals it would be off by the
    # quantization error twice over)
    result = cli_in_process("merge", tmp_path / "run", "--out", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    assert "merges into the dequantized nf4 weights" in result.stdout
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    trained = logits_of(built.unwrapped_model)
    torch.testing.assert_close(logits_of(merged), trained, rtol=0, atol=1e-4)
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("sections, expected", [
    ({"quant": {"compensation": "eora"}},
     "quant.compensation: eora compensates the error of a quantized base, and quant.method is none"),
    ({"quant": {"method": "nf4", "compensation": "eora"},
      "adapter": {"method": "dora", "r": 4}},
     "quant.compensation: eora starts a LoRA adapter (its B·A) as the compensation, and "
     "adapter.method is dora"),
    ({"quant": {"method": "nf4", "compensation": "eora"}, "adapter": {"method": "loftq", "r": 4}},
     "loftq already starts from the quantization error"),
    ({"quant": {"method": "nf4", "compensation": {"name": "eora", "damp": 0}}},
     "quant.compensation.damp"),
    ({"quant": {"method": "nf4", "compensation": "gptq"}}, "quant.compensation: must be one of eora"),
])
def test_bad_compensation_settings_are_one_line(tmp_path, tiny_model_dir, text_data, sections,
                                                expected):
    line = recipe_refusal(tmp_path, model=tiny_model_dir, data=text_data["train"], **sections)
    assert expected in line


def test_compensate_needs_held_out_text_and_calibration_examples(tmp_path, tiny_model_dir,
                                                                 text_data):
    no_val = write_recipe(tmp_path / "a.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run", quant={"method": "nf4"})
    result = cli_in_process("compensate", no_val, env={"PEFTUNE_DEBUG": ""})
    assert result.returncode == 2 and "data.val: peftune compensate scores held-out" in result.stderr

    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    missing = write_recipe(tmp_path / "b.yaml", model=tiny_model_dir, data=text_data["train"],
                           val=text_data["val"], out=tmp_path / "run2",
                           quant={"method": "nf4", "compensation": {
                               "name": "eora", "calibration": {"data": str(tmp_path / "no.jsonl")}}})
    result = cli_in_process("compensate", missing, env={"PEFTUNE_DEBUG": ""})
    assert result.returncode == 2 and "quant.compensation.calibration.data" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    blank = write_recipe(tmp_path / "c.yaml", model=tiny_model_dir, data=text_data["train"],
                         val=text_data["val"], out=tmp_path / "run3",
                         quant={"method": "nf4", "compensation": {
                             "name": "eora", "calibration": {"data": str(empty)}}})
    result = cli_in_process("compensate", blank, "--out", tmp_path / "c", env={"PEFTUNE_DEBUG": ""})
    assert result.returncode == 2, result.stderr
    assert "quant.compensation.calibration" in result.stderr
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".tmp-*"))
