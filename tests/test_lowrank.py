"""The native low-rank layer and the formulas of the methods on it; exact resume; refusals.
(Training, export round trips, merging, quantized bases and parameter counts of every
native method are rows of the method matrix in test_methods.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    NO_DEBUG,
    assert_resume_matches_uninterrupted,
    recipe_refusal,
    run_cli,
    two_linear_model,
    write_recipe,
)
from safetensors.torch import load_file
from torch import nn

from peftune.adapters import apply_adapter
from peftune.adapters.lowrank.configs import (
    DyloraConfig,
    LolduConfig,
    NolaConfig,
    SoraConfig,
    SvfitConfig,
)
from peftune.adapters.lowrank.layer import LowRankLinear, lowrank_layers
from peftune.errors import InputError
from peftune.recipe import load_recipe

Tiny = two_linear_model  # 12 -> 20 -> 12, seeded


def _random_factors(layer: LowRankLinear) -> None:
    with torch.no_grad():
        for param in (layer.lora_A, layer.lora_B, layer.lora_M):
            if param is not None:
                param.normal_()


def test_forward_adds_exactly_delta_weight():
    base = nn.Linear(12, 20)
    for core in (None, "diag", "full"):
        layer = LowRankLinear(base, rank=4, scaling=0.5, core=core, sequential=True)
        _random_factors(layer)
        with torch.no_grad():
            layer.seq_A.normal_()
            layer.seq_B.normal_()
        x = torch.randn(3, 12)
        expected = base(x) + x @ layer.delta_weight().T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        b_mat, a_mat = layer.export_factors()  # the plain LoRA carries the same change
        torch.testing.assert_close(b_mat @ a_mat, layer.delta_weight(), rtol=1e-5, atol=1e-5)
        layer.merge()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_dylora_trains_the_truncated_product_scaled_by_alpha_over_b():
    layer = LowRankLinear(nn.Linear(12, 20), rank=6, scaling=12 / 6)  # alpha 12
    _random_factors(layer)
    layer.rank_limit = 2
    layer.train()
    expected = (12 / 2) * layer.lora_B[:, :2] @ layer.lora_A[:2]
    torch.testing.assert_close(layer.delta_weight(), expected)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ expected.T)
    layer.eval()  # evaluation uses eval_rank (the full rank unless export_rank is set)
    torch.testing.assert_close(layer.delta_weight(), 2 * layer.lora_B @ layer.lora_A)


def test_sora_soft_threshold_and_pruned_export():
    model = Tiny()
    model, hooks = apply_adapter(model, SoraConfig(r=4, sparsity=1.0, target_modules=["up"]),
                                 learning_rate=0.1)
    layer = lowrank_layers(model)["up"]
    with torch.no_grad():
        layer.lora_M.copy_(torch.tensor([0.5, -0.05, 0.01, -2.0]))
        layer.lora_B.normal_()
    for after_step in hooks.after_step:
        after_step(model, 1)
    torch.testing.assert_close(layer.lora_M.detach(), torch.tensor([0.4, 0.0, 0.0, -1.9]))
    b_mat, a_mat = layer.export_factors()
    assert a_mat.shape[0] == 2  # the two zeroed gates are pruned ranks
    torch.testing.assert_close(b_mat @ a_mat, layer.delta_weight().detach())


def test_nola_factors_are_the_seeded_combination_of_random_bases():
    config = NolaConfig(r=3, num_basis=5, basis_seed=7, target_modules=["up"])
    first = lowrank_layers(apply_adapter(Tiny(), config)[0])["up"]
    again = lowrank_layers(apply_adapter(Tiny(), config)[0])["up"]
    torch.testing.assert_close(first.nola_bases_A, again.nola_bases_A)  # regenerated, not saved
    expected = sum(first.nola_alpha[i] * first.nola_bases_A[i] for i in range(5))
    torch.testing.assert_close(first.factor_A(), expected)
    assert torch.count_nonzero(first.factor_B()) == 0  # β = 0: ΔW = 0 at init
    assert {n for n, p in first.named_parameters() if p.requires_grad} == {"nola_alpha", "nola_beta"}
    assert "nola_bases_A" not in first.state_dict()


def test_svfit_trains_r_values_per_layer_and_keeps_the_model_unchanged():
    torch.manual_seed(1)
    x = torch.randn(4, 12)
    model = Tiny()
    before = model(x)
    model, _ = apply_adapter(model, SvfitConfig(r=3))
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    trained = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"up.lora_M": 3, "down.lora_M": 3}
    u, s, vh = torch.linalg.svd(Tiny().up.weight.detach())
    torch.testing.assert_close(lowrank_layers(model)["up"].lora_M.detach(), s[:3])


def test_loldu_factors_reconstruct_w_as_p_l_d_u():
    base = nn.Linear(9, 7, bias=False)
    weight = base.weight.detach().clone()
    model = nn.Sequential(base)
    model.get_output_embeddings = lambda: None
    model, _ = apply_adapter(model, LolduConfig(r=7, target_modules=["0"]))  # full rank
    layer = lowrank_layers(model)["0"]
    product = layer.lora_B @ torch.diag(layer.lora_M) @ layer.lora_A * layer.lora_scalar
    torch.testing.assert_close(product.detach(), weight, rtol=1e-5, atol=1e-5)
    assert layer.base_layer.weight.abs().max() < 1e-5  # all of W moved into the factors
    lower = layer.lora_A.detach()
    assert torch.allclose(torch.diagonal(lower), torch.ones(7))  # U is unit upper-triangular
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_M", "lora_scalar"}


# ---- resume ---------------------------------------------------------------------------------

RESUMED = {"dylora": {"r": 4}, "lamda": {"r": 4}, "dyrank": {"r": 4, "target_r": 2},
           "sora": {"r": 4}, "nola": {"r": 4, "num_basis": 4}, "s2lora": {"r": 4},
           # peft's AdaLoRA: importance averages and the final rank pattern are hook state
           "adalora": {"init_r": 6, "target_r": 4, "tfinal": 2}}


@pytest.mark.parametrize("method", sorted(RESUMED))
def test_resume_from_a_checkpoint_ends_bitwise_equal(tmp_path, tiny_model_dir, text_data, method):
    """A run of 6 steps, and the same run restarted from its step-3 checkpoint as if it had
    been killed there, end with identical adapters (the hooks' schedules included)."""
    assert_resume_matches_uninterrupted(tmp_path, model=tiny_model_dir, data=text_data["train"],
                                        adapter={"method": method, **RESUMED[method]})


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize(("adapter", "expected"), [
    ({"method": "dylora", "r": 4, "export_rank": 6},
     "adapter.export_rank (6) must not exceed the maximum rank adapter.r (4)"),
    ({"method": "nola", "num_basis": 0}, "NOLA needs at least one random basis per factor; got 0"),
    ({"method": "dyrank", "r": 4, "target_r": 6}, "adapter.target_r (6) must not exceed adapter.r (4)"),
    ({"method": "nlora", "alpha": 4}, "adapter.alpha: unknown key for adapter method nlora"),
    ({"method": "svfit", "modules_to_save": ["lm_head"]}, "native low-rank methods do not train"),
])
def test_native_recipe_refusals(tmp_path, tiny_model_dir, text_data, adapter, expected):
    line = recipe_refusal(tmp_path, model=tiny_model_dir, data=text_data["train"], adapter=adapter)
    assert expected in line, line


def test_lora_sb_with_missing_calibration_data_exits_2_before_loading(tmp_path, tiny_model_dir,
                                                                       text_data):
    path = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                        out=tmp_path / "run", adapter={"method": "lora-sb", "calibration": {
                            "data": str(tmp_path / "nowhere.jsonl")}})
    done = run_cli("train", path, timeout=120, env=NO_DEBUG)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: adapter.calibration.data:") and "nowhere.jsonl" in line, line
    assert not Path(tmp_path / "run").exists()


def test_dylora_export_rank_is_what_the_adapter_holds(tmp_path, tiny_model_dir, text_data):
    from peftune.train.run import run_train

    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run",
                          adapter={"method": "dylora", "r": 6, "export_rank": 2})
    run_train(load_recipe(recipe), quiet=True)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {2}
    tensors = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {2}
    assert DyloraConfig(r=6).export_rank is None  # default: the full rank


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_model_dir, text_data):
    from peftune.train.run import run_train

    losses = {}
    for checkpointing in (False, True):
        out = tmp_path / f"run-{checkpointing}"
        recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                              out=out, adapter={"method": "hydra", "r": 4},
                              train={"max_steps": 4, "gradient_checkpointing": checkpointing})
        run_train(load_recipe(recipe), quiet=True)
        losses[checkpointing] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()
                                 if '"loss"' in line]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_resume_refuses_a_new_length_for_methods_that_schedule_by_it(tmp_path, tiny_model_dir,
                                                                    text_data):
    from peftune.train.run import run_train

    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run", adapter={"method": "lamda", "r": 4},
                          train={"max_steps": 2, "save_every": 2})
    run_train(load_recipe(recipe), quiet=True)
    with pytest.raises(InputError, match="lamda schedules by the run's length, so train.max_steps"):
        run_train(load_recipe(recipe, ["train.max_steps=4"]), resume=True, quiet=True)


def test_every_native_config_names_an_init_rule_and_hooks_that_exist():
    """A native method is its config: the rule and hooks it names are looked up by name."""
    from peftune.adapters.lowrank import inits, training_hooks
    from peftune.adapters.lowrank.configs import LowRankConfig
    from peftune.adapters.registry import all_methods

    native = [spec.config for spec in all_methods() if issubclass(spec.config, LowRankConfig)]
    assert len(native) == 17  # IncreLoRA has its own apply
    for config in native:
        assert callable(getattr(inits, config.init_rule)), config.__name__
        for name in config.training_hooks:
            assert callable(getattr(training_hooks, name)), config.__name__
