"""The sparse-delta layer and the formulas of the methods on it (PaCA, FISH, LT-SFT, SpIEL,
DSEE); exact resume; eval and merge of the native export; refusals. (Training, export round
trips, merging and parameter counts of every method are rows of the method matrix in
test_methods.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_one_line,
    assert_resume_matches_uninterrupted,
    main_in_process,
    two_linear_model,
    write_recipe,
)
from torch import nn
from torch.nn import functional as F

from peftune.adapters import apply_adapter
from peftune.adapters.hooks import AdapterHooks
from peftune.adapters.sparse import layer as sparse_layer
from peftune.adapters.sparse.configs import (
    DseeConfig,
    FishConfig,
    LtSftConfig,
    PacaConfig,
    SpielConfig,
)
from peftune.adapters.sparse.export import load_sparse, prune_by_magnitude
from peftune.adapters.sparse.layer import SparseDeltaLinear, sparse_layers
from peftune.adapters.sparse.selection import low_rank_residual, sample_entries
from peftune.adapters.sparse.training_hooks import BoundOptimizer, prune_and_regrow

Tiny = two_linear_model  # 12 -> 20 -> 12, seeded


def _dense(layer: SparseDeltaLinear) -> torch.Tensor:
    """W + scatter(idx, δ) built the plain way."""
    delta = torch.zeros(layer.numel)
    delta[layer.sparse_indices] = layer.sparse_values.detach()
    return layer.base_layer.weight.detach() + delta.view(layer.shape)


@pytest.mark.parametrize("block_elements", [1 << 22, 24])  # one block; blocks of 2 rows
def test_forward_and_gradients_equal_the_dense_scatter(monkeypatch, block_elements):
    monkeypatch.setattr(sparse_layer, "BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(0)
    base = nn.Linear(12, 20).requires_grad_(False)  # frozen, as apply leaves it
    layer = SparseDeltaLinear(base, sample_entries(240, 37, torch.Generator().manual_seed(1)))
    with torch.no_grad():
        layer.sparse_values.normal_()
    x = torch.randn(3, 5, 12, requires_grad=True)
    y = layer(x)
    dense = _dense(layer).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    expected = F.linear(x_ref, dense, layer.base_layer.bias)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    # δ's gradient is the dense gradient read at the indices, and nothing else trains
    torch.testing.assert_close(layer.sparse_values.grad, dense.grad.reshape(-1)[layer.sparse_indices],
                               rtol=1e-5, atol=1e-5)
    assert layer.base_layer.weight.grad is None
    torch.testing.assert_close(layer.delta_weight() + layer.base_layer.weight, _dense(layer))


def test_paca_trains_whole_columns_through_the_selected_inputs():
    model = Tiny()
    model, _ = apply_adapter(model, PacaConfig(columns=3, seed=5))
    layer = sparse_layers(model)["up"]
    columns = layer.sparse_columns
    assert columns.numel() == 3 and layer.sparse_values.numel() == 3 * 20
    assert torch.equal(layer.sparse_indices % 12, columns.repeat(20))  # whole columns, every row
    with torch.no_grad():
        layer.sparse_values.normal_()
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), F.linear(x, _dense(layer), layer.base_layer.bias))
    # another seed, other columns; the same seed, the same ones
    assert not torch.equal(sparse_layers(apply_adapter(Tiny(), PacaConfig(columns=3, seed=6))[0])
                           ["up"].sparse_columns, columns)
    assert torch.equal(sparse_layers(apply_adapter(Tiny(), PacaConfig(columns=3, seed=5))[0])
                       ["up"].sparse_columns, columns)


@pytest.mark.parametrize("config", [PacaConfig(columns=2), SpielConfig(density=0.1),
                                    DseeConfig(r=2, density=0.1)], ids=lambda c: c.method)
def test_memory_is_the_trained_entries(config):
    """Trainable tensors are k deltas (plus DSEE's factors), never a dense weight-sized one,
    and so is the optimizer's state after a step."""
    model, _ = apply_adapter(Tiny(), config)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    entries = {"up": config.entries(12, 20), "down": config.entries(20, 12)}
    assert {n: p.numel() for n, p in trained.items() if n.endswith("sparse_values")} == \
        {f"{name}.sparse_values": k for name, k in entries.items()}
    assert all(p.numel() < 240 for p in trained.values())
    assert sum(p.numel() for p in trained.values()) == config.estimate_trainable(
        [type("L", (), {"dims": (12, 20)}), type("L", (), {"dims": (20, 12)})], {})
    optimizer = torch.optim.AdamW(trained.values(), lr=0.1)
    model(torch.randn(4, 12)).square().sum().backward()
    optimizer.step()
    for name, param in trained.items():
        assert optimizer.state[param]["exp_avg"].shape == param.shape, name


class FisherToy(nn.Module):
    """A 'language model' whose example i scores features X[i] through one linear layer:
    loss = t·(W·x), so ∂loss/∂W = t·xᵀ and the Fisher is the mean of (t·xᵀ)² by hand."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2, bias=False)
        self.features = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]])
        self.target = torch.tensor([1.0, -0.5])

    def forward(self, input_ids, labels=None, use_cache=False, **_):
        x = self.features[input_ids[0, 0]]
        return type("Out", (), {"loss": (self.target * self.proj(x)).sum()})

    def get_output_embeddings(self):
        return None


def test_fish_masks_the_entries_of_largest_empirical_fisher():
    toy = FisherToy()
    batch = {"input_ids": torch.tensor([[0, 1], [1, 1]]), "attention_mask": torch.ones(2, 2),
             "labels": torch.tensor([[0, 1], [1, 1]])}
    fisher = torch.stack([torch.outer(toy.target, x).square() for x in toy.features]).mean(0)
    config = FishConfig(density=0.5, calibration={"examples": 2})  # 3 of the 6 entries
    model, hooks = apply_adapter(toy, config, calibration_batches=lambda calibration: [batch])
    chosen = sparse_layers(model)["proj"].sparse_indices
    assert torch.equal(chosen, torch.topk(fisher.reshape(-1), 3).indices.sort().values)
    assert hooks.init_report["calibration_examples"] == 2


def test_spiel_prune_regrow_keeps_the_count_and_moves_optimizer_state():
    torch.manual_seed(0)
    layer = SparseDeltaLinear(nn.Linear(6, 4).requires_grad_(False), torch.tensor([1, 5, 9, 14, 20]))
    layer.set_probes(torch.tensor([2, 7, 22]))
    layer.register_buffer("probe_grad_sum", torch.tensor([0.1, -3.0, 0.5]))
    optimizer = torch.optim.AdamW([layer.sparse_values], lr=0.1)
    hooks = AdapterHooks(export=None, trainable_state=None, load_trainable_state=None)
    found = BoundOptimizer(hooks)
    for bind in hooks.bind_optimizer:
        bind(optimizer)
    layer(torch.randn(3, 6)).sum().backward()
    optimizer.step()
    assert found.optimizer is optimizer
    with torch.no_grad():
        layer.sparse_values.copy_(torch.tensor([0.5, -0.01, 0.3, 0.02, -0.4]))
    state = optimizer.state[layer.sparse_values]
    before = {k: v.clone() for k, v in state.items()}
    config = SpielConfig(density=0.5, drop_fraction=0.4, candidates=1.5)  # 2 of 5 replaced
    assert prune_and_regrow(layer, config, found.state(layer.sparse_values)) == 2
    # dropped: the smallest |δ| (indices 5 and 14); grown: the largest |Σ grad| (7, 22)
    assert layer.sparse_indices.tolist() == [1, 7, 9, 20, 22]
    assert layer.sparse_values.tolist() == pytest.approx([0.5, 0.0, 0.3, -0.4, 0.0])
    for key in ("exp_avg", "exp_avg_sq"):  # moved with their entries, zero for the new ones
        moved = state[key]
        old = before[key]
        assert moved.tolist() == pytest.approx([old[0], 0.0, old[2], old[4], 0.0])
    assert state["step"] == before["step"]


def test_lt_sft_keeps_the_entries_that_moved_most_and_resets_them(tmp_path):
    torch.manual_seed(0)
    config = LtSftConfig(density=0.1, full_steps=2)
    model, hooks = apply_adapter(Tiny(), config, total_steps=4)
    layers = sparse_layers(model)
    base_out = Tiny()(torch.ones(2, 12))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=0.05)
    for bind in hooks.bind_optimizer:  # as the run's setup does
        bind(optimizer)
    dense_seen = {}
    for step in (1, 2):
        model(torch.randn(4, 12)).square().sum().backward()
        optimizer.step()
        dense_seen = {n: layer.dense_delta.detach().clone() for n, layer in layers.items()}
        for after_step in hooks.after_step:
            after_step(model, step)
        optimizer.zero_grad()
    for name, layer in layers.items():
        k = config.entries(layer.in_features, layer.out_features)
        expected = torch.topk(dense_seen[name].abs().reshape(-1), k).indices.sort().values
        assert torch.equal(layer.sparse_indices, expected)
        assert layer.dense_delta.numel() == 0 and not layer.dense_delta.requires_grad
        assert layer.dense_delta not in optimizer.state  # its moments freed
        assert layer.sparse_values.abs().max() == 0
    torch.testing.assert_close(model(torch.ones(2, 12)), base_out)  # back at the pretrained W
    model(torch.randn(4, 12)).square().sum().backward()  # phase 2: only the k deltas learn
    optimizer.step()
    assert all(layer.sparse_values.abs().max() > 0 for layer in layers.values())


def test_dsee_residual_support_and_export_pruning(tmp_path):
    torch.manual_seed(0)
    config = DseeConfig(r=2, density=0.1, prune_density=0.5)
    chosen, _ = low_rank_residual(Tiny(), {"up": (12, 20)}, config)
    weight = Tiny().up.weight.detach()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    residual = (weight - (u[:, :2] * s[:2]) @ vh[:2]).abs().reshape(-1)
    assert torch.equal(chosen["up"]["indices"], torch.topk(residual, 24).indices.sort().values)

    pruned = prune_by_magnitude(torch.tensor([[0.1, -3.0], [2.0, 0.5]]), 0.5)
    assert pruned.tolist() == [[0.0, -3.0], [2.0, 0.0]]

    from peftune.adapters.sparse.export import export_sparse

    model, _ = apply_adapter(Tiny(), config)
    model.config = type("C", (), {"name_or_path": "tiny"})
    for layer in sparse_layers(model).values():
        with torch.no_grad():
            layer.sparse_values.normal_()
            layer.base_layer.lora_B.normal_()
    merged = {name: layer.merged_weight() for name, layer in sparse_layers(model).items()}
    export_sparse(model, tmp_path, config=config)
    loaded = load_sparse(Tiny(), tmp_path)
    for name, weight in merged.items():  # loading gives the pruned merged weights, folded
        assert isinstance(loaded.get_submodule(name), nn.Linear)
        torch.testing.assert_close(loaded.get_submodule(name).weight, prune_by_magnitude(weight, 0.5))


def test_sample_entries_are_distinct_sorted_and_avoid_the_excluded():
    gen = torch.Generator().manual_seed(0)
    exclude = torch.arange(0, 10_000, 3)
    for count in (5, 500, 6000):  # rejection sampling; a large share (a permutation)
        drawn = sample_entries(10_000, count, gen, exclude=exclude)
        assert drawn.numel() == min(count, 10_000 - exclude.numel())
        assert torch.equal(drawn, drawn.unique()) and not torch.isin(drawn, exclude).any()


# ---- runs: resume, eval and merge of the native export -----------------------------------------

RESUMED = {"lt-sft-switch-after": {"method": "lt-sft", "density": 0.05, "full_steps": 4},
           "lt-sft-switch-before": {"method": "lt-sft", "density": 0.05, "full_steps": 2},
           "spiel": {"method": "spiel", "density": 0.05, "update_interval": 2},
           "dsee": {"method": "dsee", "r": 2, "density": 0.02}}


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case == "dsee"
                                  else case for case in sorted(RESUMED)])  # DSEE: no schedule
def test_resume_from_a_checkpoint_ends_bitwise_equal(tmp_path, tiny_model_dir, text_data, case):
    """6 steps, and the same run restarted from its step-3 checkpoint: LT-SFT's phase
    switch on either side of the checkpoint, SpIEL's regrowth (indices, candidates, their
    gradient sums, the moved Adam moments), DSEE's two paths."""
    assert_resume_matches_uninterrupted(tmp_path, model=tiny_model_dir, data=text_data["train"],
                                        adapter=RESUMED[case],
                                        weights="peftune_adapter.safetensors")


def test_eval_and_merge_take_a_sparse_run(tmp_path, tiny_model_dir, text_data, capsys,
                                          monkeypatch):
    from safetensors.torch import load_file

    from peftune.recipe import load_recipe
    from peftune.train.run import run_train

    monkeypatch.delenv("PEFTUNE_DEBUG", raising=False)
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=run, adapter={"method": "spiel", "density": 0.05,
                                            "update_interval": 2},
                          train={"max_steps": 4})
    run_train(load_recipe(recipe), quiet=True)
    code, _, err = main_in_process(capsys, "merge", run, "--quiet")
    assert code == 0, err
    report = json.loads((run / "merged" / "merge_report.json").read_text())
    assert report["mode"].startswith("native") and report["verification"]["ok"] is not False
    merged = load_file(run / "merged" / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    adapter = load_file(run / "adapter" / "peftune_adapter.safetensors")
    modules = json.loads((run / "adapter" / "peftune_adapter.json").read_text())["modules"]
    for name, tensor in base.items():  # W' = W + δ at the indices, exactly; the rest as it was
        expected = tensor.clone()
        module = name.removesuffix(".weight")
        if module in modules:
            expected.view(-1)[adapter[f"{module}.indices"].long()] += adapter[f"{module}.values"]
        assert torch.equal(merged[name], expected), name
    code, _, err = main_in_process(capsys, "eval", run, "--task", "perplexity", "--data",
                                   text_data["val"], "--max-examples", "4")
    assert code == 0, err


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize(("adapter", "train", "expected"), [
    ({"method": "spiel", "density": 1.5}, {}, "adapter.density: must be <= 1, got 1.5"),
    ({"method": "fish", "density": 0}, {}, "adapter.density: must be > 0, got 0"),
    ({"method": "spiel", "update_interval": 10}, {},
     "adapter.update_interval: 10 steps between regrowths leave no regrowth in a run of 6"),
    ({"method": "spiel", "update_interval": 40}, {"max_steps": None, "epochs": 1},
     "adapter.update_interval: 40 steps between regrowths leave no regrowth in a run of"),
    ({"method": "lt-sft", "full_steps": 6}, {}, "adapter.full_steps: 6 dense steps leave no sparse"),
    ({"method": "paca", "columns": 4, "density": 0.1}, {},
     "give one of adapter.columns (4) and adapter.density (0.1), not both"),
    ({"method": "paca", "columns": 100}, {}, "adapter.columns: 100 is more than layer"),
    ({"method": "spiel", "update_interval": 2}, {"optimizer": "adamw8bit"},
     "train.optimizer: adamw8bit keeps"),
    ({"method": "dsee"}, {"quant": "nf4"}, "quant.method: nf4 cannot be combined with "
                                           "adapter.method: dsee"),
])
def test_bad_sparse_recipes_exit_2_with_one_line(tmp_path, tiny_model_dir, text_data, capsys,
                                                 monkeypatch, adapter, train, expected):
    monkeypatch.delenv("PEFTUNE_DEBUG", raising=False)
    train = dict(train)
    sections = {"quant": {"method": train.pop("quant")}} if "quant" in train else {}
    path = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                        out=tmp_path / "run", adapter=adapter, train=train, **sections)
    code, _, err = main_in_process(capsys, "train", path)
    assert_one_line(code, err, expected)
    assert not Path(tmp_path / "run").exists()
