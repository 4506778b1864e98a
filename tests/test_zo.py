"""Zeroth-order training (`train.strategy: {name: zo}`, peftune.train.zo): MeZO's SPSA step and
ZO-AdaMU's on hand-built tensors against their formulas; runs that never call backward, log
the projected gradient and resume bitwise; a full fine-tune with no optimizer state; DDP
(slow); the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    LAUNCH_ENV,
    adapter_weights,
    assert_one_line,
    assert_resume_matches_uninterrupted,
    main_in_process,
    max_abs_diff,
    read_metrics,
    run_cli,
    train_in_process,
    write_recipe,
)

from peftune.errors import InputError
from peftune.train.zo import ADAMU_BETA2, ZerothOrder, direction_seed

ZO = {"name": "zo", "eps": 1e-3}
LORA = {"method": "lora", "r": 4, "alpha": 8}


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]


def _quadratic(params: list) -> float:
    """L(θ) = ½‖θ‖²: its central difference is exact, (L(θ+εz) - L(θ-εz))/(2ε) = θ·z."""
    return float(sum((p.double() ** 2).sum() for p in params) / 2)


def _gaussians(seed: int, shapes: list, per_param: int = 1) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator) for _ in range(per_param)] for shape in shapes]


@pytest.mark.parametrize("n_samples", [1, 2])
def test_mezo_step_is_spsa_on_a_hand_built_tensor(n_samples):
    """θ ← θ(1 - lr·wd) - lr·(1/n)Σ g_i z_i with g_i = (L(θ+εz_i) - L(θ-εz_i))/(2ε), z_i
    regenerated from (seed, step, i); two loss evaluations per direction, no gradient, no
    optimizer state."""
    params = _params()
    start = [p.detach().clone() for p in params]
    lr, eps, decay = 0.1, 0.1, 0.5  # the quadratic's estimate is exact at any ε
    calls = []
    optimizer = ZerothOrder([{"params": [params[0]], "weight_decay": decay},
                             {"params": [params[1]], "weight_decay": 0.0}],
                            lr=lr, eps=eps, n_samples=n_samples, seed=7)
    optimizer.step(lambda: calls.append(1) or _quadratic(params))

    update = [torch.zeros_like(p) for p in start]
    projected = []
    for i in range(n_samples):
        z = [zs[0] for zs in _gaussians(direction_seed(7, 1, i), [p.shape for p in start])]
        plus = _quadratic([p + eps * zi for p, zi in zip(start, z, strict=True)])
        minus = _quadratic([p - eps * zi for p, zi in zip(start, z, strict=True)])
        g = (plus - minus) / (2 * eps)
        exact = float(sum((p * zi).sum() for p, zi in zip(start, z, strict=True)))
        assert g == pytest.approx(exact, rel=1e-5)  # the estimate of ∇L·z = θ·z
        projected.append(g)
        for u, zi in zip(update, z, strict=True):
            u += g * zi / n_samples
    expected = [start[0] * (1 - lr * decay) - lr * update[0], start[1] - lr * update[1]]
    for param, want in zip(params, expected, strict=True):
        torch.testing.assert_close(param.detach(), want, rtol=0, atol=2e-5)
    assert len(calls) == 2 * n_samples
    assert all(p.grad is None for p in params) and len(optimizer.state) == 0
    assert optimizer.param_groups[0]["zo_step"] == 1
    assert optimizer.last_grad_norm == pytest.approx(sum(map(abs, projected)) / n_samples,
                                                     rel=1e-3)


def test_adamu_perturbs_around_its_momentum_and_scales_by_the_second_moment():
    """Two ZO-AdaMU steps against the formulas: u = (1-c)√α z1 + c(m + √(1-α) z2),
    v ← β2 v + (1-β2) u², θ ← θ - lr·g·u / (√(v/(1-β2^t)) + 1e-8), m ← u."""
    params = _params()
    theta = [p.detach().clone() for p in params]
    lr, eps, c, alpha = 0.05, 0.1, 0.3, 0.6
    optimizer = ZerothOrder([{"params": params, "weight_decay": 0.0}], lr=lr, eps=eps, seed=3,
                            variant="adamu", momentum=c, uncertainty=alpha)
    m = [torch.zeros_like(p) for p in theta]
    v = [torch.zeros_like(p) for p in theta]
    for step in (1, 2):
        optimizer.step(lambda: _quadratic(params))
        draws = _gaussians(direction_seed(3, step, 0), [p.shape for p in theta], per_param=2)
        u = [(1 - c) * math.sqrt(alpha) * z1 + c * (mi + math.sqrt(1 - alpha) * z2)
             for (z1, z2), mi in zip(draws, m, strict=True)]
        g = float(sum((p * ui).sum() for p, ui in zip(theta, u, strict=True)))  # exact SPSA
        v = [ADAMU_BETA2 * vi + (1 - ADAMU_BETA2) * ui ** 2 for vi, ui in zip(v, u, strict=True)]
        theta = [p - lr * g * ui / ((vi / (1 - ADAMU_BETA2 ** step)).sqrt() + 1e-8)
                 for p, ui, vi in zip(theta, u, v, strict=True)]
        m = u
        for param, want, mi in zip(params, theta, m, strict=True):
            torch.testing.assert_close(param.detach(), want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(optimizer.state[param]["momentum"], mi)


def test_a_non_finite_loss_leaves_the_weights_and_is_reported():
    params = _params()
    before = [p.detach().clone() for p in params]
    optimizer = ZerothOrder([{"params": params, "weight_decay": 0.0}], lr=0.1, seed=0)
    optimizer.step(lambda: math.inf)
    assert not math.isfinite(optimizer.last_loss)
    for param, old in zip(params, before, strict=True):
        torch.testing.assert_close(param.detach(), old, rtol=0, atol=1e-6)
    assert optimizer.param_groups[0]["zo_step"] == 0  # the step is not counted


@pytest.mark.parametrize(("strategy", "steps"), [({**ZO, "n_samples": 2}, 8),
                                                 ({**ZO, "variant": "adamu"}, 4)],
                         ids=["mezo", "adamu"])
def test_zo_runs_forward_only_and_resumes_exactly(tmp_path, tiny_model_dir, text_data,
                                                  monkeypatch, strategy, steps):
    """A LoRA run under zo never calls backward; it logs loss, lr, the |projected gradient|
    and tokens/s like any run, and stopped at its halfway checkpoint then resumed it ends
    bitwise equal (seeds from train.seed and the step; AdaMU's moments in the optimizer
    state). MeZO's 8 steps lower the loss."""
    def no_backward(*args, **kwargs):
        raise AssertionError("a zo run called backward")

    monkeypatch.setattr(torch.autograd, "backward", no_backward)
    adamu = strategy.get("variant") == "adamu"
    run = assert_resume_matches_uninterrupted(
        tmp_path, model=tiny_model_dir, data=text_data["train"], adapter=LORA, steps=steps,
        train_keys={"lr": 1e-3 if adamu else 2e-2, "strategy": strategy})
    records = [r for r in read_metrics(run.whole) if "loss" in r]
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["lr"] > 0 for r in records)
    assert any(float(w.abs().max()) > 0 for k, w in run.whole_weights.items() if "lora_B" in k)
    if not adamu:
        losses = [r["loss"] for r in records]
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_zo_full_fine_tune_keeps_no_optimizer_state(tmp_path, tiny_model_dir, text_data):
    """adapter.method: full under zo: every weight moves, the optimizer holds nothing per
    parameter (AdamW would hold two moments of each) and no parameter has a gradient."""
    from peftune.train.strategies import optimizer_state_bytes

    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run", adapter={"method": "full"},
                          train={"max_steps": 3, "lr": 1e-3, "strategy": ZO})
    built, summary = train_in_process(recipe)
    assert summary["steps"] == 3
    assert optimizer_state_bytes(built.optimizer) == 0
    assert all(p.grad is None for p in built.unwrapped_model.parameters())
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize(("train", "message"), [
    ({"strategy": ZO, "gradient_checkpointing": True},
     "train.gradient_checkpointing: strategy zo runs forward passes only"),
    ({"strategy": ZO, "optimizer": "lion"}, "train.optimizer: strategy zo is its own optimizer"),
    ({"strategy": {**ZO, "variant": "adamu", "n_samples": 2}},
     "train.strategy.n_samples: variant adamu takes one perturbation per step"),
    ({"strategy": {**ZO, "momentum": 0.2}},
     "train.strategy.momentum: is read only by strategy zo with variant: adamu"),
    ({"strategy": {**ZO, "eps": 0}}, "train.strategy.eps"),
], ids=["checkpointing", "lion", "adamu-samples", "mezo-momentum", "eps-zero"])
def test_zo_refusals_are_one_line_with_exit_2(tmp_path, capsys, monkeypatch, tiny_model_dir,
                                               text_data, train, message):
    monkeypatch.setenv("PEFTUNE_DEBUG", "")
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "out", train=train)
    code, _, err = main_in_process(capsys, "validate", recipe)
    assert_one_line(code, err, message)


def test_zo_refuses_methods_that_score_by_gradients(tmp_path, capsys, monkeypatch,
                                                   tiny_model_dir, text_data):
    monkeypatch.setenv("PEFTUNE_DEBUG", "")
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "out", adapter={"method": "adalora", "init_r": 4,
                                                         "target_r": 2},
                          train={"strategy": ZO})
    code, _, err = main_in_process(capsys, "validate", recipe)
    assert_one_line(code, err, "train.strategy.name: strategy zo computes no gradients, and "
                               "AdaLoRA allocates rank by gradient sensitivity")


def test_zo_is_refused_under_a_sharding_engine(monkeypatch, tiny_model_dir):
    from peftune.recipe.schema import TrainSection
    from peftune.train.optim import build_optimizer

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(InputError, match="train.strategy: strategy zo does not run under FSDP"):
        build_optimizer(torch.nn.Linear(2, 2), TrainSection(strategy=ZO))


@pytest.mark.slow
def test_zo_on_two_processes_trains_as_one_with_twice_the_accumulation(tmp_path, tiny_model_dir,
                                                                         text_data):
    """`--nproc 2` (gloo DDP): each process evaluates its half of the batch, the losses are
    all-reduced and both apply the same seeded update; the adapter matches one process with
    grad_accum 2 up to the order of the loss sums."""
    def recipe(name: str, **train) -> str:
        return str(write_recipe(tmp_path / f"{name}.yaml", model=tiny_model_dir,
                                data=text_data["train"], out=tmp_path / name, adapter=LORA,
                                train={"max_steps": 4, "strategy": ZO, **train}))

    one = run_cli("train", recipe("one", grad_accum=2), timeout=300, env=LAUNCH_ENV)
    two = run_cli("train", recipe("two"), "--nproc", "2", timeout=300, env=LAUNCH_ENV)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert max_abs_diff(adapter_weights(tmp_path / "one"), adapter_weights(tmp_path / "two")) < 1e-5
