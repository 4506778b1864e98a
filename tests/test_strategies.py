"""Training strategies: LISA's layer sampling and GaLore's projected optimizer (full
fine-tunes), IST's importance-sampled PEFT layers, and the Lion optimizer; their
optimizer-state memory against AdamW; exact resume; refusals. Zeroth order: test_zo.py."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    NO_DEBUG,
    assert_resume_matches_uninterrupted,
    main_in_process,
    read_metrics,
    run_cli,
    write_recipe,
)
from safetensors.torch import load_file

from peftune.errors import InputError
from peftune.recipe import load_recipe
from peftune.recipe.schema import TrainSection
from peftune.train.ist import IST_SCORES, IstSampler
from peftune.train.optim import build_optimizer
from peftune.train.run import run_train
from peftune.train.strategies import LisaSampler, optimizer_state_bytes

LISA = {"name": "lisa", "layers": 1, "interval": 2}
GALORE = {"name": "galore", "rank": 4, "update_proj_gap": 2}
IST = {"name": "ist", "layers": 1, "score_interval": 2}
LORA = {"method": "lora", "r": 4, "alpha": 8}


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory) -> Path:
    from peftune.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny4", hidden_size=64,
                            layers=4, heads=4, seed=0)


def _model(path: Path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _step(model, optimizer, *, after=None, step: int = 1) -> None:
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(step))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    if after is not None:
        after(model, step)
    optimizer.zero_grad(set_to_none=True)


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


# ---- LISA --------------------------------------------------------------------------------


def test_lisa_trains_the_drawn_layers_and_releases_the_others_state(four_layer_dir):
    """Period 0 changes only its drawn layer and the non-layer tensors; at the resample the
    frozen layers lose their gradients, requires_grad and Adam state."""
    model = _model(four_layer_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lisa = LisaSampler(model, optimizer, layers=1, interval=2, seed=0)
    first = lisa.active
    # frozen at the first forward, not before: the loop gathers the parameters it clips, and
    # DDP its reducer, from those that require a gradient when they start
    assert all(p.requires_grad for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, optimizer, after=lisa.after_step, step=1)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {_layer(n) for n in changed} == {None, *first}
    assert any(_layer(n) is None and "embed" in n for n in changed)  # embeddings always train
    in_state = {_layer(n) for n, p in model.named_parameters() if p in optimizer.state}
    assert in_state == {None, *first}
    full_state = optimizer_state_bytes(optimizer)

    _step(model, optimizer, after=lisa.after_step, step=2)  # the resample, after this step
    assert lisa.period == 1 and lisa.active == lisa.draw(1)
    for name, param in model.named_parameters():
        layer = _layer(name)
        if layer is not None and layer not in lisa.active:
            assert not param.requires_grad and param.grad is None and param not in optimizer.state
    if lisa.active != first:  # the old layer's moments are gone until it is drawn again
        assert {_layer(n) for n, p in model.named_parameters() if p in optimizer.state} == {None}
        assert optimizer_state_bytes(optimizer) < full_state


def test_lisa_draws_are_seeded_and_vary(four_layer_dir):
    model = _model(four_layer_dir)
    optimizer = torch.optim.AdamW(model.parameters())
    a = LisaSampler(model, optimizer, layers=2, interval=3, seed=0)
    b = LisaSampler(model, optimizer, layers=2, interval=3, seed=0)
    c = LisaSampler(model, optimizer, layers=2, interval=3, seed=1)
    draws = [a.draw(k) for k in range(12)]
    assert draws == [b.draw(k) for k in range(12)]
    assert draws != [c.draw(k) for k in range(12)]
    assert len({tuple(d) for d in draws}) > 1 and all(len(set(d)) == 2 for d in draws)
    for step in range(1, 7):  # resampled every `interval` steps, to the period's draw
        a.after_step(model, step)
        assert a.active == a.draw(step // 3)


def test_lisa_and_galore_hold_less_optimizer_state_than_adamw(four_layer_dir):
    """Optimizer-state bytes after one step on the same model: a structural property, so
    the ratio is asserted below 1 (the figures are printed, not asserted)."""
    sizes = {}
    for name in ("adamw", "lisa", "galore"):
        model = _model(four_layer_dir)
        if name == "galore":
            optimizer = build_optimizer(model, TrainSection(strategy={**GALORE, "rank": 8}))
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        hook = (LisaSampler(model, optimizer, layers=1, interval=5, seed=0).after_step
                if name == "lisa" else None)
        _step(model, optimizer, after=hook)
        sizes[name] = optimizer_state_bytes(optimizer)
    print({k: f"{v / sizes['adamw']:.3f}" for k, v in sizes.items()})
    assert sizes["lisa"] < sizes["adamw"] and sizes["galore"] < sizes["adamw"]


def _ddp_worker(rank: int, path: str, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = _model(Path(path))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    wrapped = DistributedDataParallel(model, find_unused_parameters=True)  # as ddp_kwargs says
    lisa = LisaSampler(model, optimizer, layers=1, interval=2, seed=0)
    for step in range(1, 6):  # each rank its own batch; two resamples
        ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(10 * step + rank))
        wrapped(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is None for i, block in enumerate(lisa.blocks) if i not in lisa.active
                   for p in block.parameters())
        optimizer.step()
        lisa.after_step(model, step)
        optimizer.zero_grad(set_to_none=True)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    both = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(both, flat)
    if rank == 0:
        torch.save({"equal": torch.equal(*both), "changed": lisa.period}, out)
    dist.destroy_process_group()


def test_only_the_layer_strategies_ask_ddp_to_find_unused_parameters():
    from peftune.train.strategies import strategy_handlers

    for strategy in (LISA, IST):
        (handler,) = strategy_handlers(TrainSection(strategy=strategy))
        assert handler.to_kwargs() == {"find_unused_parameters": True}
    assert strategy_handlers(TrainSection(strategy=GALORE)) == strategy_handlers(TrainSection()) == []
    assert strategy_handlers(TrainSection(strategy={"name": "zo"})) == []


def test_lisa_under_two_process_ddp_keeps_the_ranks_equal(tmp_path, four_layer_dir):
    """gloo DDP, different data per rank: every rank draws the same layers (no
    communication), the frozen layers get no gradient, the weights stay identical."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(str(four_layer_dir), port, str(out)), nprocs=2)
    result = torch.load(out)
    assert result == {"equal": True, "changed": 2}


def _run(tmp_path: Path, name: str, model: Path, data: Path, strategy: dict, **train):
    recipe = write_recipe(tmp_path / f"{name}.yaml", model=model, data=data,
                          out=tmp_path / name, adapter={"method": "full"},
                          train={"lr": 5e-3, "strategy": strategy, **train})
    run_train(load_recipe(recipe), quiet=True)
    return recipe, tmp_path / name


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").open() if '"loss"' in line]


@pytest.mark.parametrize("strategy", [LISA, GALORE], ids=["lisa", "galore"])
def test_strategy_trains_exports_a_model_and_resumes_exactly(tmp_path, tiny_model_dir,
                                                             four_layer_dir, text_data, strategy):
    """6 steps lower the loss and leave a model/ transformers loads; the same run restarted
    from its step-3 checkpoint ends with bitwise the same weights (LISA's draw and GaLore's
    projectors come back from the checkpoint)."""
    from transformers import AutoModelForCausalLM

    # LISA on 4 layers: seed 0 draws layer 3, then 2, then 3 (a layer frozen and drawn again)
    model_dir = four_layer_dir if strategy["name"] == "lisa" else tiny_model_dir
    recipe, run = _run(tmp_path, "a", model_dir, text_data["train"], strategy,
                       max_steps=6, save_every=3)
    losses = _losses(run)
    assert losses[-1] < losses[0] - 0.3
    loaded = AutoModelForCausalLM.from_pretrained(run / "model")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    changed = {_layer(n) for (n, p), q in zip(loaded.named_parameters(), base.parameters(),
                                               strict=True) if not torch.equal(p, q)}
    if strategy["name"] == "lisa":  # exactly the layers some period drew, and the rest
        drew = LisaSampler(base, torch.optim.SGD(base.parameters()), layers=1, interval=2,
                           seed=0)
        assert changed == {None, *(i for k in range(3) for i in drew.draw(k))} != {None, 0, 1, 2, 3}
    else:
        assert changed == {None, 0, 1}

    crashed = tmp_path / "b"
    shutil.copytree(run, crashed)
    for name in ("model", "checkpoints/step-6", "summary.json", "loss.png"):
        shutil.rmtree(crashed / name) if (crashed / name).is_dir() else (crashed / name).unlink()
    run_train(load_recipe(recipe, [f"output.dir={crashed}"]), resume=True, quiet=True)
    first = load_file(run / "model" / "model.safetensors")
    second = load_file(crashed / "model" / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert _losses(crashed) == losses


def test_galore_projects_the_decoder_matrices_only(four_layer_dir):
    model = _model(four_layer_dir)
    optimizer = build_optimizer(model, TrainSection(strategy=GALORE, weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    projected = [g for g in optimizer.param_groups if "rank" in g]
    assert len(projected) == 1 and projected[0]["rank"] == 4
    assert projected[0]["update_proj_gap"] == 2 and projected[0]["scale"] == 0.25
    in_group = {names[id(p)] for p in projected[0]["params"]}
    expected = {n for n, p in model.named_parameters() if p.ndim == 2 and _layer(n) is not None}
    assert in_group == expected and len(expected) == 4 * 7
    _step(model, optimizer)
    q = model.model.layers[0].self_attn.q_proj.weight
    state = optimizer.state[q]
    # a 64 x 64 gradient G projected on the right, G P^T: the moments live in rank 4
    assert state["exp_avg"].shape == (64, 4)
    assert state["projector"].ortho_matrix.shape == (4, 64)
    head = model.get_output_embeddings().weight
    assert optimizer.state[head]["exp_avg"].shape == head.shape  # plain AdamW


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU-only machines")
def test_galore_8bit_is_refused_without_cuda(four_layer_dir):
    with pytest.raises(InputError, match="train.optimizer: adamw8bit with strategy galore "
                                         "needs a CUDA GPU"):
        build_optimizer(_model(four_layer_dir), TrainSection(strategy=GALORE,
                                                             optimizer="adamw8bit"))


# ---- IST -----------------------------------------------------------------------------------


def _lora_model(path: Path):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(_model(path), LoraConfig(r=4, lora_alpha=8,
                                                   target_modules=["q_proj", "v_proj"]))


def _ist(model, **keys) -> IstSampler:
    settings = dict(layers=2, interval=1, score_interval=10, score_trials=3, score_layers=None,
                    suppression=0.25, score_lr=10.0, seed=0)
    return IstSampler(model, **{**settings, **keys})


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def test_ist_trains_only_the_drawn_layers_peft_modules(four_layer_dir):
    """The drawn layers' LoRA weights change; the others' are frozen with no gradient, and
    the base never trains. A checkpoint still holds every layer's LoRA weights (the method
    picks them by requires_grad) and the scores; loading one restores the draw."""
    from peftune.adapters.common import load_trainable_state, trainable_state
    from peftune.adapters.hooks import AdapterHooks

    model = _lora_model(four_layer_dir)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ist = _ist(model)
    ist.before_step(model, 0, lambda: 0.0)
    assert len(ist.active) == 2 and ist.active == ist.draw(0)
    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    _step(model, optimizer)
    changed = {_layer(n) for n, p in _trainable(model).items() if not torch.equal(p, before[n])}
    assert changed == set(ist.active)
    for name, param in model.named_parameters():
        if "lora_" not in name or _layer(name) not in ist.active:
            assert not param.requires_grad and param.grad is None, name

    method_hooks = AdapterHooks(export=None, trainable_state=trainable_state,
                                load_trainable_state=load_trainable_state)
    state = ist.hooks(method_hooks).trainable_state(model)
    assert {_layer(n) for n in state if "lora_" in n} == {0, 1, 2, 3}
    assert torch.equal(state[IST_SCORES], ist.scores)
    assert sum(p.requires_grad for p in _trainable(model).values()) == 2 * 2 * 2  # frozen again
    fresh_model = _lora_model(four_layer_dir)
    fresh = _ist(fresh_model)
    fresh.hooks(method_hooks).load_trainable_state(fresh_model, state)
    assert fresh.active == ist.active and not fresh.applied
    for name, param in _trainable(fresh_model).items():
        assert torch.equal(param, _trainable(model)[name])


def _suppressible_loss(model, weight: dict[int, float]):
    """A loss in which each layer's LoRA change adds weight[layer] x its mean |B|."""
    def loss() -> float:
        return 2.0 + sum(weight.get(_layer(n), 0.0) * float(p.detach().abs().mean())
                         for n, p in _trainable(model).items() if "lora_B" in n)
    return loss


def test_ist_scores_follow_the_suppression_rewards(four_layer_dir):
    """One round: each trial's loss is taken with its layers' change scaled by 0.25 (and the
    weights restored exactly after), and s_l += η·(r_j - mean r)·σ(s_l)(1 - σ(s_l)) with
    r_j = exp(-L_j). Over rounds the layer whose change hurts (layer 0) gains score and is
    drawn less than the one whose change helps (layer 3)."""
    model = _lora_model(four_layer_dir)
    ist = _ist(model, layers=1, score_layers=2)  # B starts at 0 (p0)
    with torch.no_grad():
        for name, param in _trainable(model).items():
            if "lora_B" in name:
                param.fill_(0.5)  # a learned change in every layer
    weight = {0: 1.0, 3: -1.0}
    step_loss = _suppressible_loss(model, weight)
    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    draws = ist.trial_draws(10)
    losses = ist.update_scores(10, step_loss)
    assert len(draws) == 3 and len(set(draws)) == 3
    for n, p in _trainable(model).items():
        assert torch.equal(p, before[n]), n  # restored exactly
    expected_losses = [2.0 + sum(w * 2 * 0.5 * (0.25 if layer in trial else 1.0)  # q, v
                                 for layer, w in weight.items()) for trial in draws]
    assert losses == pytest.approx(expected_losses, rel=1e-6)
    rewards = [math.exp(-loss) for loss in losses]
    expected = torch.zeros(4, dtype=torch.float64)
    for trial, reward in zip(draws, rewards, strict=True):
        for layer in trial:
            expected[layer] += 10.0 * (reward - sum(rewards) / 3) * 0.25
    torch.testing.assert_close(ist.scores, expected)
    for step in range(20, 120, 10):
        ist.update_scores(step, step_loss)
    assert ist.scores[0] > 0 > ist.scores[3]
    chance = ist.probabilities(-1.0)
    assert chance[0] < chance[3]


def test_ist_draws_depend_only_on_the_seed_the_scores_and_the_period(four_layer_dir):
    """What makes DDP ranks agree with no communication: the same seed and scores (which
    every rank computes from the same all-reduced losses) give the same draws."""
    a, b = _ist(_lora_model(four_layer_dir)), _ist(_lora_model(four_layer_dir))
    c = _ist(_lora_model(four_layer_dir), seed=1)
    assert [a.draw(k) for k in range(8)] == [b.draw(k) for k in range(8)]
    assert [a.draw(k) for k in range(8)] != [c.draw(k) for k in range(8)]
    assert a.trial_draws(10) == b.trial_draws(10)
    b.scores[1] = 5.0  # a much less important layer: drawn less often
    assert sum(1 in b.draw(k) for k in range(40)) < sum(1 in a.draw(k) for k in range(40))


def _ist_ddp_worker(rank: int, path: str, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = _lora_model(Path(path))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    wrapped = DistributedDataParallel(model, find_unused_parameters=True)  # as ddp_kwargs says
    ist = _ist(model, layers=1, score_interval=2)
    for step in range(6):  # each rank its own batch; the step's loss summed over the ranks
        ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(10 * step + rank))

        def step_loss(ids=ids) -> float:
            with torch.no_grad():
                loss = model(input_ids=ids, labels=ids).loss.detach().clone()
            dist.all_reduce(loss)
            return float(loss)

        ist.before_step(model, step, step_loss)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()] + [ist.scores.float()])
    both = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(both, flat)
    if rank == 0:
        torch.save({"equal": torch.equal(*both), "scored": bool((ist.scores != 0).any())}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_ist_under_two_process_ddp_keeps_the_ranks_equal(tmp_path, four_layer_dir):
    """gloo DDP, different data per rank: the all-reduced trial losses give every rank the
    same scores, so every rank freezes the same layers; the weights stay identical."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "ddp.pt"
    mp.spawn(_ist_ddp_worker, args=(str(four_layer_dir), port, str(out)), nprocs=2)
    assert torch.load(out) == {"equal": True, "scored": True}


def test_ist_lora_run_trains_exports_every_layer_and_resumes_exactly(tmp_path, four_layer_dir,
                                                                     text_data):
    """6 steps, one of 4 layers at a time, scores updated at steps 2 and 4: the loss falls,
    the export holds every layer's LoRA weights, the checkpoint holds the scores, and the run
    restarted from its step-3 checkpoint ends bitwise equal."""
    run = assert_resume_matches_uninterrupted(tmp_path, model=four_layer_dir,
                                              data=text_data["train"], adapter=LORA,
                                              train_keys={"strategy": IST})
    losses = [r["loss"] for r in read_metrics(run.whole) if "loss" in r]
    assert losses[-1] < losses[0]
    assert {_layer(k) for k in run.whole_weights} == {0, 1, 2, 3}
    trained = {_layer(k) for k, w in run.whole_weights.items()
               if "lora_B" in k and float(w.abs().max()) > 0}
    assert 0 < len(trained) <= 4
    scores = load_file(run.whole / "checkpoints" / "step-6" / "trainable.safetensors")[IST_SCORES]
    assert scores.shape == (4,) and bool((scores != 0).any())


# ---- Lion ----------------------------------------------------------------------------------


def test_lion_step_is_the_formula_on_a_hand_built_layer():
    """θ ← θ(1 - lr·λ) - lr·sign(β1·m + (1-β1)·g), m ← β2·m + (1-β2)·g (bitsandbytes' Lion,
    train.lion_betas; decay on the matrix, not the bias)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    lr, (b1, b2), decay = 0.1, (0.8, 0.95), 0.5
    optimizer = build_optimizer(layer, TrainSection(optimizer="lion", lr=lr, lion_betas=(b1, b2),
                                                    weight_decay=decay))
    theta = {p: p.detach().clone() for p in layer.parameters()}
    moment = {p: torch.zeros_like(p) for p in layer.parameters()}
    for _ in range(3):
        for param in layer.parameters():
            param.grad = torch.randn_like(param)
        optimizer.step()
        for param in layer.parameters():
            g, wd = param.grad, decay if param.ndim == 2 else 0.0
            theta[param] = theta[param] * (1 - lr * wd) - lr * torch.sign(b1 * moment[param]
                                                                          + (1 - b1) * g)
            moment[param] = b2 * moment[param] + (1 - b2) * g
            torch.testing.assert_close(param.detach(), theta[param], rtol=0, atol=1e-6)
            torch.testing.assert_close(optimizer.state[param]["state1"], moment[param])


def test_lion_keeps_half_of_adamws_optimizer_state(four_layer_dir):
    """One moment per parameter against AdamW's two: the state bytes after a step."""
    sizes = {}
    for name in ("adamw", "lion"):
        model = _model(four_layer_dir)
        optimizer = build_optimizer(model, TrainSection(optimizer=name, lr=1e-3))
        _step(model, optimizer)
        sizes[name] = optimizer_state_bytes(optimizer)
    assert sizes["lion"] / sizes["adamw"] == pytest.approx(0.5, abs=0.01)


def test_lion_run_resumes_exactly(tmp_path, tiny_model_dir, text_data):
    run = assert_resume_matches_uninterrupted(tmp_path, model=tiny_model_dir,
                                              data=text_data["train"], adapter=LORA,
                                              train_keys={"optimizer": "lion", "lr": 5e-3})
    losses = [r["loss"] for r in read_metrics(run.whole) if "loss" in r]
    assert losses[-1] < losses[0]


def test_validate_shows_the_strategy_and_optimizer_keys(tmp_path, capsys, tiny_model_dir,
                                                        text_data):
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "out", adapter=LORA,
                          train={"strategy": {"name": "ist"}, "optimizer": "lion"})
    code, out, _ = main_in_process(capsys, "validate", recipe)
    assert code == 0
    for line in ("name: ist", "interval: 1", "score_interval: 10", "suppression: 0.25",
                 "optimizer: lion", "lion_betas"):
        assert line in out, line


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(("adapter", "quant", "train", "message"), [
    ({"method": "full"}, {}, {"strategy": {**LISA, "layers": 3}},
     "train.strategy.layers: 3 active layers is more than the model's 2 decoder layers"),
    ({"method": "full"}, {"method": "nf4"}, {"strategy": GALORE},
     "quant.method: strategy galore updates every weight of the base and cannot train over "
     "a nf4 base"),
    ({"method": "lora", "r": 4}, {}, {"strategy": LISA},
     "train.strategy.name: strategy lisa trains the base's own weights and needs "
     "adapter.method: full, got lora"),
    ({"method": "full"}, {}, {"strategy": {**LISA, "period": 5}}, "train.strategy.period"),
    ({"method": "full"}, {}, {"strategy": {**LISA, "rank": 5}},
     "strategy lisa has no such key"),
    ({"method": "full"}, {}, {"strategy": {"name": "adam-mini"}}, "train.strategy.name"),
    ({"method": "full"}, {}, {"strategy": GALORE, "optimizer": "paged_adamw"},
     "strategy galore has no paged optimizer"),
    ({"method": "full"}, {}, {"strategy": {**GALORE, "rank": 32}},
     "train.strategy.rank: 32 is not below the model's hidden size 32"),
    ({"method": "full"}, {}, {"strategy": {**LISA, "eps": 0.1}},
     "train.strategy.eps: strategy lisa has no such key; only strategy zo reads it"),
    ({"method": "full"}, {}, {"strategy": GALORE, "optimizer": "lion"},
     "strategy galore has no Lion optimizer"),
    ({"method": "full"}, {}, {"strategy": IST},
     "train.strategy.name: strategy ist draws the PEFT modules of decoder layers, and "
     "adapter.method full trains the base's own weights; for a full fine-tune use strategy lisa"),
    ({"method": "lamda", "r": 4}, {}, {"strategy": IST},
     "strategy ist freezes and unfreezes layers' parameters, and LaMDA freezes B"),
    (LORA, {}, {"strategy": {**IST, "layers": 3}},
     "train.strategy.layers: 3 active layers is more than the model's 2 decoder layers"),
    (LORA, {}, {"strategy": {**IST, "score_layers": 3}},
     "train.strategy.score_layers: 3 suppressed layers is more than the model's 2"),
    (LORA, {}, {"strategy": {**IST, "suppression": 1.0}}, "train.strategy.suppression"),
    (LORA, {}, {"optimizer": "lion", "adam_betas": [0.9, 0.99]},
     "train.adam_betas: train.optimizer: lion does not read Adam's betas; set "
     "train.lion_betas"),
    (LORA, {}, {"lion_betas": [0.95, 0.98]},
     "train.lion_betas: is read only with train.optimizer: lion (got adamw)"),
    (LORA, {}, {"optimizer": "lion", "lion_betas": [0.9]},
     "train.lion_betas: expected two numbers in"),
], ids=["lisa-too-many-layers", "galore-over-nf4", "non-full-method", "unknown-key",
        "other-strategys-key", "unknown-strategy", "galore-paged", "galore-rank-too-high",
        "zo-key-in-lisa", "galore-lion", "ist-full", "ist-lamda", "ist-too-many-layers",
        "ist-score-layers", "ist-suppression", "lion-adam-betas", "lion-betas-adamw",
        "lion-betas-short"])
def test_bad_strategies_are_refused_at_validate(tmp_path, tiny_model_dir, text_data, adapter,
                                                quant, train, message):
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "out", adapter=adapter, quant=quant, train=train)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(recipe)
    assert not (tmp_path / "out").exists()


def test_validate_cli_refuses_lisa_layers_with_exit_2(tmp_path, tiny_model_dir, text_data):
    """`peftune validate` reads the model's config.json: no model is loaded, no traceback."""
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "out", adapter={"method": "full"},
                          train={"strategy": {**LISA, "layers": 5}})
    result = run_cli("validate", recipe, timeout=120, env=NO_DEBUG)
    assert result.returncode == 2
    assert "train.strategy.layers: 5 active layers" in result.stderr
    assert "Traceback" not in result.stderr
