"""MoLA: the mixture's formula, the expert schedule, the load-balancing loss, the refusals.
The method matrix (tests/test_methods.py) trains it, reloads its native export and resumes."""

from __future__ import annotations

import torch
from conftest import assert_one_line, main_in_process, write_recipe
from transformers import AutoModelForCausalLM

from peftune.adapters import apply_adapter
from peftune.adapters.mola.configs import MolaConfig
from peftune.adapters.mola.model import mola_layers


def _model(tiny_model_dir, **keys):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = MolaConfig(**{"r": 2, "target_modules": ["q_proj", "down_proj"], **keys})
    model, hooks = apply_adapter(model, config, total_steps=4)
    return model, hooks, mola_layers(model)


def test_each_token_mixes_its_top_k_experts_renormalised(tiny_model_dir):
    model, _, layers = _model(tiny_model_dir, experts=[2, 3], top_k=2, alpha=4)
    assert [layer.experts for layer in layers.values()] == [2, 2, 3, 3]
    layer = layers["model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, layer.in_features)
    probs = torch.softmax(x @ layer.router.T, dim=-1)
    expected = layer.base_layer(x)
    for t in range(5):
        top = probs[t].topk(2)
        for p, e in zip(top.values / top.values.sum(), top.indices, strict=True):
            expected[t] += (alpha_over_r := 4 / 2) * p * (layer.lora_B[e] @ layer.lora_A[e] @ x[t])
    assert alpha_over_r == layer.scaling
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_the_schedule_gives_higher_layers_more_experts():
    assert MolaConfig(experts=8).experts_per_layer(8) == [2, 2, 4, 4, 6, 6, 8, 8]
    assert MolaConfig(experts=8).experts_per_layer(30)[::6] == [2, 2, 4, 6, 8]
    assert MolaConfig(experts=3, schedule="uniform").experts_per_layer(4) == [3, 3, 3, 3]
    assert MolaConfig(experts=4).experts_per_layer(2) == [1, 3]


def test_the_load_balancing_loss_reaches_the_router(tiny_model_dir):
    model, hooks, layers = _model(tiny_model_dir, experts=4, schedule="uniform", top_k=1,
                                  router_aux_loss=0.5)
    model(torch.randint(0, 200, (2, 9))).logits.sum()  # the forward stores each layer's term
    terms = torch.stack([layer.balance for layer in layers.values()])
    assert torch.all(terms >= 1 - 1e-6)  # E·Σ f·P is 1 when balanced, more when not
    loss = hooks.extra_loss(model)
    assert torch.allclose(loss, 0.5 * terms.mean())
    loss.backward()
    assert all(layer.router.grad.abs().sum() > 0 for layer in layers.values())


def test_refusals_are_one_line(tmp_path, tiny_model_dir, text_data, monkeypatch, capsys):
    monkeypatch.delenv("PEFTUNE_DEBUG", raising=False)
    for keys, expected in (
            ({"experts": [2, 2, 2]}, "adapter.experts: a list of 3 counts for a model of 2 "
                                     "decoder layers"),
            ({"experts": 2, "top_k": 3}, "adapter.top_k (3) is more than adapter.experts (2)"),
            ({"experts": [2, 0]}, "not a positive number of experts")):
        recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                              out=tmp_path / "run", adapter={"method": "mola", "r": 2, **keys})
        code, _, err = main_in_process(capsys, "train", recipe)
        assert_one_line(code, err, expected)
        assert not (tmp_path / "run").exists()
