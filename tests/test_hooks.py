"""The loop calls whatever hooks a method hands it (extra loss, after-step) and nothing else:
a method registered here, unknown to the loop, changes training only through its hooks."""

from __future__ import annotations

from typing import Literal

import pytest
from conftest import write_recipe

from peftune.adapters import registry
from peftune.adapters.lora.model import apply_lora
from peftune.adapters.specs import LoraConfig
from peftune.recipe import load_recipe
from peftune.train.run import run_train

CALLS: dict[str, list] = {"after_step": [], "extra_loss": 0}


class HookedConfig(LoraConfig):
    method: Literal["hooked-lora"] = "hooked-lora"  # type: ignore[assignment]
    penalty: float = 0.0


def apply_hooked(model, config: HookedConfig, **context):
    model, hooks = apply_lora(model, config, **context)

    def extra_loss(m):
        CALLS["extra_loss"] += 1
        lora = [p for n, p in m.named_parameters() if "lora_" in n]
        return config.penalty * sum(p.pow(2).sum() for p in lora)

    hooks.extra_loss = extra_loss
    hooks.after_step.append(lambda m, step: CALLS["after_step"].append(step))
    return model, hooks


@pytest.fixture
def hooked_method():
    spec = registry.MethodSpec(
        name="hooked-lora", config=HookedConfig, apply=f"{__name__}:apply_hooked",
        description="LoRA with an L2 penalty, for tests", paper="-", mergeable=True,
        quantized=registry.BNB_4BIT, exports_plain_lora=True)
    CALLS["after_step"].clear()
    CALLS["extra_loss"] = 0
    with registry.registered(spec):
        yield spec


def test_hooks_are_called_and_shape_training(tmp_path, tiny_model_dir, text_data, hooked_method):
    def run(name: str, penalty: float) -> dict:
        recipe = write_recipe(tmp_path / f"{name}.yaml", model=tiny_model_dir,
                              data=text_data["train"], out=tmp_path / name,
                              adapter={"method": "hooked-lora", "r": 4, "penalty": penalty},
                              train={"max_steps": 5, "grad_accum": 2, "batch_size": 2})
        run_train(load_recipe(recipe), quiet=True)
        from safetensors.torch import load_file

        return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")

    free = run("free", 0.0)
    assert CALLS["after_step"] == [1, 2, 3, 4, 5]
    assert CALLS["extra_loss"] == 10  # once per micro-batch: 5 steps x 2 micro-batches
    penalised = run("penalised", 10.0)
    norm = lambda w: sum(t.pow(2).sum() for t in w.values())  # noqa: E731
    assert norm(penalised) < norm(free)  # the extra loss reached the gradients


def test_an_unknown_method_lists_the_choices(tmp_path, tiny_model_dir, text_data):
    from peftune.errors import InputError

    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run", adapter={"method": "lorra"})
    with pytest.raises(InputError) as err:
        load_recipe(recipe)
    assert "lorra" in str(err.value) and "lora" in str(err.value) and "full" in str(err.value)


def test_the_loop_never_names_a_method():
    import inspect

    import peftune.train.artifacts as artifacts
    import peftune.train.loop as loop
    import peftune.train.run as run

    source = inspect.getsource(loop) + inspect.getsource(run) + inspect.getsource(artifacts)
    for name in registry.method_names():
        assert f'"{name}"' not in source and f"'{name}'" not in source
