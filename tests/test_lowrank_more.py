"""MoS, LoRA-SP and IncreLoRA on the native low-rank layer: their formulas, IncreLoRA's
growth and optimizer state (also under 2-process DDP), exact resume, refusals. (Training,
export round trips, merging, quantized bases and the validate-time counts are rows of the
method matrix in test_methods.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    LAUNCH_ENV,
    NO_DEBUG,
    adapter_weights,
    assert_resume_matches_uninterrupted,
    max_abs_diff,
    recipe_refusal,
    run_cli,
    write_recipe,
)
from torch import nn

from peftune.adapters import apply_adapter
from peftune.adapters.lowrank.budget_configs import (
    AfloraConfig,
    IncreloraConfig,
    LoraSpConfig,
    MosConfig,
)
from peftune.adapters.lowrank.layer import lowrank_layers
from peftune.recipe import load_recipe


class Tiny(nn.Module):
    """Three linear layers; `mid` and `down` read 20 wide, `up` and `mid` write 20 wide."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(12, 20)
        self.mid = nn.Linear(20, 20)
        self.down = nn.Linear(20, 12)

    def forward(self, x):
        return self.down(torch.relu(self.mid(torch.relu(self.up(x)))))

    def get_output_embeddings(self):
        return None


def _train(model, hooks, steps, *, weight_decay=0.0, lr=1e-2, on_step=None):
    torch.manual_seed(1)
    x, y = torch.randn(16, 12), torch.randn(16, 12)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    losses = []
    for step in range(1, steps + 1):
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step, optimizer)
        for after_step in hooks.after_step:
            after_step(model, step)
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return optimizer, losses


# ---- MoS ---------------------------------------------------------------------------------

def test_mos_factors_are_concatenations_of_routed_shards_shared_across_layers():
    config = MosConfig(r=4, shards_per_vector=2, private_fraction=0.25, sharing_ratio=2)
    model, _ = apply_adapter(Tiny(), config)
    layers = lowrank_layers(model)
    private, public = config.slots()
    assert (private, public) == (2, 6)  # 8 slots per factor, a quarter private
    for name, layer in layers.items():
        pool_a, pool_b = layer.mos_pools
        a_shards = layer.factor_A().detach().reshape(-1, layer.in_features // 2)  # r·2 shards
        b_shards = layer.factor_B().detach().T.reshape(-1, layer.out_features // 2)
        for shards, pool, own in ((a_shards, pool_a, layer.mos_private_A),
                                  (b_shards, pool_b, layer.mos_private_B)):
            assert shards.shape[0] == config.r * 2
            # every slot holds one shard, of the shared pool or the layer's own
            from_pool = [int(torch.nonzero((pool == s).all(1)).flatten()[0])
                         for s in shards if (pool == s).all(1).any()]
            from_own = [s for s in shards if (own == s).all(1).any()]
            if torch.count_nonzero(pool) and torch.count_nonzero(own):  # A: random shards
                assert len(from_pool) == public and len(from_own) == private, name
                assert len(set(from_pool)) == public  # no pool shard twice in one layer
    # `mid` and `down` read 20 wide: one A pool, the same tensor; `up` has its own
    assert layers["mid"].mos_pools[0] is layers["down"].mos_pools[0]
    assert layers["up"].mos_pools[0] is not layers["mid"].mos_pools[0]
    assert layers["up"].mos_pools[1] is layers["mid"].mos_pools[1]  # B pools: 20 high
    before = {n: layers[n].factor_A().detach().clone() for n in ("mid", "down")}
    with torch.no_grad():  # a change to the shared pool reaches both layers' public slots
        layers["mid"].mos_pools[0].add_(1.0)
    for name in ("mid", "down"):
        change = (layers[name].factor_A().detach() - before[name]).reshape(-1, 10)
        moved = torch.isclose(change, torch.ones_like(change)).all(1)
        assert int(moved.sum()) == public and torch.count_nonzero(change[~moved]) == 0


def test_mos_shared_shards_are_counted_once_and_far_below_lora():
    config = MosConfig(r=4, shards_per_vector=2, private_fraction=0.125, sharing_ratio=8)
    model, _ = apply_adapter(Tiny(), config)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = sum(4 * (m.in_features + m.out_features) for m in (Tiny().up, Tiny().mid, Tiny().down))
    private, public = config.slots()
    # pools: A 6-wide (up), A 10-wide (mid, down), B 10-high (up, mid), B 6-high (down),
    # each at least one layer's public slots; plus every layer's private shards
    pools = public * (6 + 10 + 10 + 6)
    own = private * sum((m.in_features + m.out_features) // 2 for m in (Tiny().up, Tiny().mid,
                                                                       Tiny().down))
    assert trained == pools + own
    layer_names = [name for name, _ in model.named_parameters() if "mos_pool" in name]
    assert len(layer_names) == 4  # each pool registered on one layer only
    assert trained < lora


# ---- LoRA-SP -------------------------------------------------------------------------------

def test_lora_sp_frozen_entries_never_move_and_only_free_entries_count():
    config = LoraSpConfig(r=4, frozen_fraction=0.5, seed=3, alpha=8)
    model, hooks = apply_adapter(Tiny(), config)
    layers = lowrank_layers(model)
    before = {name: (layer.factor_A().detach().clone(), layer.factor_B().detach().clone())
              for name, layer in layers.items()}
    _, losses = _train(model, hooks, 6, weight_decay=0.1)  # decay would move frozen entries
    assert losses[-1] < losses[0]
    expected_count = 0
    for name, layer in layers.items():
        for factor, start, now in (("A", before[name][0], layer.factor_A().detach()),
                                   ("B", before[name][1], layer.factor_B().detach())):
            free = torch.zeros(start.numel(), dtype=torch.bool)
            free[getattr(layer, f"sp_free_index_{factor}")] = True
            free = free.view_as(start)
            assert int(free.sum()) == start.numel() - start.numel() // 2
            assert torch.equal(now[~free], start[~free]), (name, factor)  # bitwise fixed
            assert (now[free] != start[free]).float().mean() > 0.9  # the free ones trained
            expected_count += int(free.sum())
        assert torch.count_nonzero(before[name][1]) == 0  # B starts at zero (LoRA)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected_count
    # the frozen set is drawn from the seed: the same again, another for another seed
    again = lowrank_layers(apply_adapter(Tiny(), config)[0])["mid"].sp_free_index_A
    other = lowrank_layers(apply_adapter(Tiny(), LoraSpConfig(r=4, seed=4))[0])["mid"].sp_free_index_A
    assert torch.equal(again, layers["mid"].sp_free_index_A)
    assert not torch.equal(other, again)


# ---- IncreLoRA -----------------------------------------------------------------------------

def _increlora(**keys):
    config = IncreloraConfig(**{"init_r": 1, "max_r": 3, "target_r": 2, "warmup_steps": 0,
                                "add_interval": 1, "add_until": 1.0, **keys})
    model, hooks = apply_adapter(Tiny(), config, total_steps=10)
    return model, hooks, lowrank_layers(model)


def _ranks(layers):
    return {name: int(layer.lora_mask.sum()) for name, layer in layers.items()}


def test_increlora_adds_components_to_the_most_important_module_up_to_max_r():
    model, hooks, layers = _increlora(components_per_add=1)
    assert _ranks(layers) == {"up": 1, "mid": 1, "down": 1}
    assert {layer.rank for layer in layers.values()} == {3}  # capacity min(3, 1 + 3)
    with torch.no_grad():  # crafted: only `mid` has sensitive entries (|w·g| large)
        for name, layer in layers.items():
            scale = 10.0 if name == "mid" else 0.01
            for p in (*layer.inc_A, *layer.inc_B):
                p.fill_(1.0)
                p.grad = torch.full_like(p, scale)
    grow = hooks.after_step[-1]
    grow(model, 1)
    assert _ranks(layers) == {"up": 1, "mid": 2, "down": 1}
    for step in (2, 3):
        for layer in layers.values():
            for p in (*layer.inc_A, *layer.inc_B):
                p.grad = torch.full_like(p, 10.0 if layer is layers["mid"] else 0.01)
        grow(model, step)
    ranks = _ranks(layers)
    assert ranks["mid"] == 3  # it reached max_r and got no more
    assert sum(ranks.values()) == 6 and max(ranks.values()) <= 3  # the budget: 2 per module
    for step in (4, 5, 6):  # the budget is spent: nothing more is added
        grow(model, step)
    assert _ranks(layers) == ranks
    b_mat, a_mat = layers["mid"].export_factors()
    assert a_mat.shape[0] == 3  # the exported rank is the module's active components


def test_increlora_new_components_start_with_zero_moments_and_active_state_is_kept():
    """A component added after step 3 has no optimizer state until then (zero moments, and
    weight decay has not moved it); its first update (step 4) is Adam's first step; the
    addition leaves the active components' state as it was."""
    model, hooks, layers = _increlora(components_per_add=1, add_interval=3)
    inactive = {id(p): p.detach().clone() for layer in layers.values()
                for p in (*layer.inc_A[1:], *layer.inc_B[1:])}
    seen = {}

    def check(step, optimizer):
        if step == 3:  # after the optimizer step, before the addition
            seen["optimizer"] = optimizer
            seen["states"] = {p: {k: v.clone() for k, v in optimizer.state[p].items()}
                              for p in optimizer.state}
            for layer in layers.values():
                for p in (*layer.inc_A[1:], *layer.inc_B[1:]):
                    assert p not in optimizer.state
                    assert torch.equal(p.detach(), inactive[id(p)])
        if step == 4:
            (layer, pair), = [(layer, i) for layer in layers.values()
                              for i, on in enumerate(layer.inc_on) if on and i > 0]
            for p in (layer.inc_A[pair], layer.inc_B[pair]):
                state = optimizer.state[p]
                assert int(state["step"]) == 1  # bias correction starts afresh
                torch.testing.assert_close(state["exp_avg"], (1 - 0.9) * p.grad)
                torch.testing.assert_close(state["exp_avg_sq"], (1 - 0.999) * p.grad * p.grad)
            assert torch.count_nonzero(layer.inc_B[pair].grad) > 0
            seen["checked"] = True

    def after_addition(model_, step):
        if step == 3:
            optimizer = seen["optimizer"]
            assert sum(on for layer in layers.values() for on in layer.inc_on) == 4
            assert set(optimizer.state) == set(seen["states"])  # the new one: still none
            for p, state in seen["states"].items():
                for key, value in state.items():
                    assert torch.equal(optimizer.state[p][key], value)

    hooks.after_step.append(after_addition)
    _, losses = _train(model, hooks, 4, weight_decay=0.1, on_step=check)
    assert seen.get("checked") and losses[-1] < losses[0]


def test_increlora_refusals(tmp_path, tiny_model_dir, text_data):
    for adapter, key, expected in (
        ({"method": "increlora", "init_r": 4, "max_r": 2}, "adapter.max_r",
         "adapter.max_r (2) must not be below adapter.init_r (4)"),
        ({"method": "increlora", "init_r": 2, "max_r": 4, "target_r": 6}, "adapter.target_r",
         "adapter.target_r (6.0) must lie between adapter.init_r (2) and adapter.max_r (4)"),
        ({"method": "increlora", "warmup_steps": 5, "add_interval": 5}, "adapter.warmup_steps",
         "leave no step to add components within adapter.add_until (0.8) of a run of 6 steps"),
        ({"method": "mos", "shards_per_vector": 3}, "adapter.shards_per_vector",
         "3 must divide the dimensions of every targeted layer"),
        ({"method": "lora-sp", "frozen_fraction": 1.0}, "adapter.frozen_fraction", "must be < 1, got 1"),
    ):
        line = recipe_refusal(tmp_path, model=tiny_model_dir, data=text_data["train"],
                              adapter=adapter, train={"max_steps": 6})
        assert key in line and expected in line, line


def test_increlora_max_r_below_init_r_exits_2_at_validate(tmp_path, tiny_model_dir, text_data):
    path = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                        out=tmp_path / "run", adapter={"method": "increlora", "init_r": 4,
                                                       "max_r": 3})
    done = run_cli("validate", path, timeout=120, env=NO_DEBUG)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "adapter.max_r (3) must not be below adapter.init_r (4)" in line, line


def test_increlora_resume_is_bitwise_equal_and_exports_per_module_ranks(tmp_path, tiny_model_dir,
                                                                        text_data):
    """6 steps, and 3 + 3 from the step-3 checkpoint, with components added at steps 3 and 5
    (one before the checkpoint, one after, chosen by importance averages that span the
    checkpoint): identical adapters and rank patterns."""
    adapter = {"method": "increlora", "init_r": 2, "max_r": 4, "target_r": 3, "alpha": 8,
               "warmup_steps": 1, "add_interval": 2, "add_until": 1.0, "components_per_add": 2}
    runs = assert_resume_matches_uninterrupted(tmp_path, model=tiny_model_dir,
                                               data=text_data["train"], adapter=adapter)
    configs = [json.loads((run / "adapter" / "adapter_config.json").read_text())
               for run in (runs.whole, runs.resumed)]
    assert configs[0]["rank_pattern"] == configs[1]["rank_pattern"]
    ranks = list(configs[0]["rank_pattern"].values())
    modules = len(ranks)
    assert sum(ranks) == 2 * modules + 2 * 2  # two additions of two components each
    assert min(ranks) == 2 and max(ranks) <= 4
    summary = json.loads((runs.whole / "summary.json").read_text())
    assert summary["trainable_params"] > 0


@pytest.mark.parametrize("adapter", [{"method": "mos", "r": 4, "sharing_ratio": 2},
                                     {"method": "lora-sp", "r": 4}], ids=["mos", "lora-sp"])
def test_mos_and_lora_sp_resume_bitwise_equal(tmp_path, tiny_model_dir, text_data, adapter):
    """Shared pools (saved once, on their owner layer) and free entries come back exactly;
    routing indices and frozen values are regenerated from the seed."""
    assert_resume_matches_uninterrupted(tmp_path, model=tiny_model_dir, data=text_data["train"],
                                        adapter=adapter, steps=4)


def test_increlora_under_two_process_ddp_trains_what_one_process_trains_with_accumulation_2(
        tmp_path, tiny_model_dir, text_data):
    """2 processes x micro-batch 2 (gloo) against 1 process x micro-batch 2 x accumulation 2:
    the same components added (the importance averages read the all-reduced gradients) and
    the same adapter, so an inactive component keeps a gradient of None under DDP (a zero
    gradient would give it Adam state before it is added)."""
    from peftune.train.run import run_train

    adapter = {"method": "increlora", "init_r": 2, "max_r": 4, "target_r": 3, "alpha": 8,
               "warmup_steps": 1, "add_interval": 2, "add_until": 1.0}
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "two", adapter=adapter,
                          train={"max_steps": 4, "batch_size": 2, "weight_decay": 0.1})
    done = run_cli("train", recipe, "--nproc", "2", timeout=300, env=LAUNCH_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    run_train(load_recipe(recipe, ["train.grad_accum=2", f"output.dir={tmp_path / 'one'}"]),
              quiet=True)
    two, one = (adapter_weights(tmp_path / run) for run in ("two", "one"))
    assert max_abs_diff(two, one) <= 1e-6
    assert max(float(t.abs().max()) for key, t in one.items() if "lora_B" in key) > 1e-4  # trained
    patterns = [json.loads((tmp_path / run / "adapter" / "adapter_config.json").read_text())
                ["rank_pattern"] for run in ("two", "one")]
    assert patterns[0] == patterns[1] and sum(patterns[0].values()) > 2 * len(patterns[0])  # grew


# ---- AFLoRA ------------------------------------------------------------------------------

def test_aflora_is_the_vector_scaled_path_and_starts_at_zero():
    model, hooks = apply_adapter(Tiny(), AfloraConfig(r=3, target_modules=["up", "mid"]),
                                 total_steps=10)
    x = torch.randn(4, 12)
    assert torch.equal(model(x), Tiny()(x))  # Λ_u = 0: the model is unchanged at init
    _train(model, hooks, 3)
    for layer in lowrank_layers(model).values():
        assert layer.aflora_u.abs().sum() > 0
        expected = torch.diag(layer.aflora_u) @ layer.lora_B @ torch.diag(layer.lora_M) \
            @ layer.lora_A
        assert torch.allclose(layer.delta_weight(), expected, atol=1e-7)
        b_mat, a_mat = layer.export_factors()  # the plain LoRA peft loads
        assert torch.allclose(b_mat @ a_mat, expected, atol=1e-6)


def test_aflora_freezes_the_lowest_scoring_projections_on_a_cubic_schedule():
    """Gradients chosen so that |θ·∇θ| is c_k everywhere in projection k: the scores rank as
    c_k. With warmup 0 and final 0.5 of 4 steps, step 1 must have 1 - (1/2)^3 = 7/8 of the 6
    projections frozen (5, rounded): all but the one with the largest c; the vectors train."""
    model, hooks = apply_adapter(
        Tiny(), AfloraConfig(r=2, target_modules=["up", "mid", "down"], warmup=0.0, final=0.5),
        total_steps=4)
    layers = list(lowrank_layers(model).values())
    projections = [(layer, name) for layer in layers for name in ("A", "B")]
    weights = [3.0, 1.0, 6.0, 2.0, 5.0, 4.0]
    for (layer, name), c in zip(projections, weights, strict=True):
        param = getattr(layer, f"lora_{name}")
        param.grad = c / param.detach()
    for update in hooks.after_step:
        update(model, 1)
    trains = [getattr(layer, f"lora_{name}").requires_grad for layer, name in projections]
    assert trains == [False, False, True, False, False, False]  # all but c = 6
    assert all(layer.aflora_u.requires_grad and layer.lora_M.requires_grad for layer in layers)
    ranked = [float((layer.aflora_ipt_A if name == "A" else layer.aflora_ipt_B).mean())
              for layer, name in projections]
    assert ranked == pytest.approx([(1 - 0.85) * c for c in weights], rel=1e-5)


def test_aflora_keys_are_checked(tmp_path, tiny_model_dir, text_data):
    line = recipe_refusal(tmp_path, model=tiny_model_dir, data=text_data["train"],
                          adapter={"method": "aflora", "warmup": 0.5, "final": 0.6})
    assert "adapter.warmup (0.5) + adapter.final (0.6)" in line
