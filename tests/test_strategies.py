"""Training strategies of a full fine-tune: LISA's layer sampling and GaLore's projected
optimizer; their optimizer-state memory against full AdamW; exact resume; refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import NO_DEBUG, run_cli, write_recipe
from safetensors.torch import load_file

from peftune.errors import InputError
from peftune.recipe import load_recipe
from peftune.recipe.schema import TrainSection
from peftune.train.optim import build_optimizer
from peftune.train.run import run_train
from peftune.train.strategies import LisaSampler, optimizer_state_bytes

LISA = {"name": "lisa", "layers": 1, "interval": 2}
GALORE = {"name": "galore", "rank": 4, "update_proj_gap": 2}


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


def test_only_lisa_asks_ddp_to_find_unused_parameters():
    from peftune.train.strategies import strategy_handlers

    (handler,) = strategy_handlers(TrainSection(strategy=LISA))
    assert handler.to_kwargs() == {"find_unused_parameters": True}
    assert strategy_handlers(TrainSection(strategy=GALORE)) == strategy_handlers(TrainSection()) == []


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
], ids=["lisa-too-many-layers", "galore-over-nf4", "non-full-method", "unknown-key",
        "other-strategys-key", "unknown-strategy", "galore-paged", "galore-rank-too-high"])
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
