"""Bottleneck adapters and Compacter: the series / parallel formulas by hand, the Kronecker
sum and its parameter count, the exact start, training and reload through the native
loader, resume, eval and merge on a run directory, and the refusals."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest
import torch
from conftest import IDS as SHARED_IDS
from conftest import (
    NO_DEBUG,
    assert_resume_matches_uninterrupted,
    cli_in_process,
    logits_of,
    read_metrics,
    recipe_refusal,
    train_in_session,
    write_recipe,
)
from safetensors.torch import load_file

from peftune.adapters.bottleneck.configs import (
    NATIVE_CONFIG,
    NATIVE_WEIGHTS,
    BottleneckConfig,
    CompacterConfig,
)
from peftune.adapters.bottleneck.model import (
    ATTRIBUTE,
    PHMLinear,
    attach,
    find_sub_blocks,
    load_bottleneck,
    phm_weight,
)
from peftune.errors import InputError

IDS = SHARED_IDS[:, :9]  # the shared ids' first nine tokens


def _cli(*args) -> subprocess.CompletedProcess:
    return cli_in_process(*args, env=NO_DEBUG)  # no fresh interpreter: seconds a call


def _tiny(arch: str = "llama") -> torch.nn.Module:
    """A 2-layer model of hidden size 32 built from its config (nothing read from disk)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    common = dict(vocab_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config = {
        "llama": lambda: LlamaConfig(hidden_size=32, intermediate_size=64, **common),
        "qwen2": lambda: Qwen2Config(hidden_size=32, intermediate_size=64, **common),
        "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128,
                                   n_positions=64),
    }[arch]()
    return AutoModelForCausalLM.from_config(config).eval()


def _randomise(model) -> None:
    """Non-zero up-projections, so the adapters change something."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in getattr(model, ATTRIBUTE).parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


CONFIGS = [
    BottleneckConfig(placement="series", sublayers=["attn", "mlp"], bottleneck_size=8),
    BottleneckConfig(placement="parallel", sublayers=["attn", "mlp"], reduction_factor=4,
                     nonlinearity="gelu", scaling=2.0),
    CompacterConfig(placement="series", sublayers=["attn", "mlp"], bottleneck_size=8, phm_dim=4,
                    nonlinearity="tanh"),
    CompacterConfig(placement="parallel", sublayers=["mlp"], bottleneck_size=4, phm_dim=2,
                    nonlinearity="silu"),
]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{c.placement}")
def test_the_adapted_model_starts_exactly_as_the_base_then_adds_the_formula(arch, config):
    """Zero up-projection: identical logits at init. Then, with random adapter weights, each
    sub-block's output is f(x) + a(f(x)) (series) or f(x) + a(x) (parallel), with a computed
    here by hand from the stored tensors, on Llama (keyword input), Qwen2 and GPT-2
    (positional input)."""
    model = _tiny(arch)
    base = logits_of(copy.deepcopy(model), IDS)
    path, found = find_sub_blocks(model, ["attn", "mlp"])
    blocks = model.get_submodule(path)
    seen: dict = {}

    def capture(key, stage):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            seen[key, stage] = (x.detach().clone(), out.detach().clone())
        return hook

    for sub in config.sublayers:  # before the adapters' hooks: the raw sub-block
        getattr(blocks[0], found[0][sub]).register_forward_hook(capture(sub, "raw"), with_kwargs=True)
    attach(model, config, seed=3)
    assert torch.equal(logits_of(model, IDS), base)
    _randomise(model)
    for sub in config.sublayers:  # after them: what the layer goes on with
        getattr(blocks[0], found[0][sub]).register_forward_hook(capture(sub, "out"), with_kwargs=True)
    adapted = logits_of(model, IDS)
    assert (adapted - base).abs().max() > 1e-3
    adapters = getattr(model, ATTRIBUTE)
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu,
           "silu": torch.nn.functional.silu, "tanh": torch.tanh}[config.nonlinearity]
    for sub in config.sublayers:
        x, raw = seen[sub, "raw"]
        _, out = seen[sub, "out"]
        z = raw if config.placement == "series" else x
        adapter = adapters.layers[0][sub]
        if config.kronecker:
            rule = adapters.phm_rule
            w_down = sum(torch.kron(rule[i], torch.outer(adapter.down.s[i], adapter.down.t[i]))
                         for i in range(config.phm_dim))
            w_up = sum(torch.kron(rule[i], torch.outer(adapter.up.s[i], adapter.up.t[i]))
                       for i in range(config.phm_dim))
            b_down, b_up = adapter.down.bias, adapter.up.bias
        else:
            w_down, b_down = adapter.down.weight, adapter.down.bias
            w_up, b_up = adapter.up.weight, adapter.up.bias
        expected = raw + config.scaling * (act(z @ w_down.T + b_down) @ w_up.T + b_up)
        torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-5)


def test_kronecker_sum_weight_and_the_compacter_parameter_count():
    """phm_weight is Σ A_i ⊗ s_i·t_iᵀ (torch.kron); one shared A for every projection of
    every adapter, so the model trains n³ + Σ_adapters 3(d + m) parameters."""
    generator = torch.Generator().manual_seed(0)
    n, rule = 4, torch.randn(4, 4, 4, generator=generator)
    layer = PHMLinear(32, 8, n, zero=False, generator=generator)
    explicit = sum(torch.kron(rule[i], torch.outer(layer.s[i], layer.t[i])) for i in range(n))
    assert layer.weight(rule).shape == (8, 32)
    torch.testing.assert_close(layer.weight(rule), explicit, rtol=1e-6, atol=1e-6)
    assert torch.linalg.matrix_rank(explicit.detach()) > 1  # a sum of rank-one B_i, not rank one
    z = torch.randn(3, 32, generator=generator)
    torch.testing.assert_close(layer(z, rule), z @ explicit.T + layer.bias)
    torch.testing.assert_close(phm_weight(rule[:1], layer.s[:1], layer.t[:1]),
                               torch.kron(rule[0], torch.outer(layer.s[0], layer.t[0])))

    model = _tiny()
    config = CompacterConfig(sublayers=["attn", "mlp"], bottleneck_size=8, phm_dim=4)
    attach(model, config)
    trained = {name: p.numel() for name, p in model.named_parameters()
               if name.startswith(ATTRIBUTE)}
    d, m, adapters = 32, 8, 2 * 2
    assert sum(trained.values()) == n ** 3 + adapters * 3 * (d + m) == config.count(d, 2)
    assert [name for name in trained if "phm_rule" in name] == [f"{ATTRIBUTE}.phm_rule"]
    # the shared A_i collect gradient from every projection of every layer
    logits_of(model, IDS)
    _randomise(model)
    model(input_ids=IDS).logits.sum().backward()
    assert getattr(model, ATTRIBUTE).phm_rule.grad.abs().sum() > 0
    plain = BottleneckConfig(sublayers=["mlp"], reduction_factor=4)
    assert plain.count(32, 2) == 2 * (2 * 32 * 8 + 8 + 32)


# ---- training, reload, resume, eval, merge ---------------------------------------------------

@pytest.mark.parametrize("adapter", [
    {"method": "bottleneck", "placement": "series", "sublayers": ["attn"], "bottleneck_size": 8},
    {"method": "compacter", "placement": "parallel", "sublayers": ["attn", "mlp"],
     "reduction_factor": 4, "phm_dim": 2, "nonlinearity": "gelu"},
], ids=["bottleneck", "compacter"])
def test_training_lowers_the_loss_and_the_loader_reproduces_the_trained_logits(
        tmp_path, tiny_model_dir, text_data, adapter):
    from transformers import AutoModelForCausalLM

    path = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                        out=tmp_path / "run", adapter=adapter, train={"max_steps": 10})
    recipe, built, _, losses, out = train_in_session(path)
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    trained = logits_of(built.unwrapped_model, IDS)
    described = json.loads((out / "adapter" / NATIVE_CONFIG).read_text())
    assert described["method"] == adapter["method"]
    assert described["settings"]["placement"] == adapter["placement"]
    assert described["base_model_name_or_path"] == str(tiny_model_dir)
    assert not (out / "adapter" / "adapter_config.json").exists()  # not a PEFT adapter
    weights = load_file(out / "adapter" / NATIVE_WEIGHTS)
    assert sum(t.numel() for t in weights.values()) == built.trainable_params
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base = logits_of(fresh, IDS)
    loaded = load_bottleneck(fresh, out / "adapter")
    torch.testing.assert_close(logits_of(loaded, IDS), trained, rtol=0, atol=1e-5)
    assert (trained - base).abs().max() > 1e-3
    assert not any(p.requires_grad for p in getattr(loaded, ATTRIBUTE).parameters())
    with pytest.raises(InputError, match="already has bottleneck adapters"):
        load_bottleneck(loaded, out / "adapter")


def test_resume_from_a_checkpoint_ends_with_the_same_adapter(tmp_path, tiny_model_dir, text_data):
    """6 steps in one go, and the same run restarted from its step-3 checkpoint as if it
    had been killed there, export identical weights (trainable_state / load_trainable_state)."""
    adapter = {"method": "compacter", "sublayers": ["attn", "mlp"], "bottleneck_size": 8,
               "phm_dim": 4}
    runs = assert_resume_matches_uninterrupted(tmp_path, model=tiny_model_dir,
                                               data=text_data["train"], adapter=adapter,
                                               weights=NATIVE_WEIGHTS)
    first = runs.whole_weights
    assert "phm_rule" in first
    step_3 = runs.resumed / "checkpoints" / "step-3"
    start = load_file(step_3 / next(p.name for p in step_3.iterdir()
                                    if p.name.endswith(".safetensors") and "optim" not in p.name))
    moved = [k for k in first if f"{ATTRIBUTE}.{k}" in start
             and not torch.equal(start[f"{ATTRIBUTE}.{k}"], first[k])]
    assert moved  # steps 4-6 changed the adapter: the comparison above is not vacuous


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_model_dir, text_data):
    """The hooks also run when checkpointed layers are recomputed for the backward pass."""
    adapter = {"method": "compacter", "placement": "parallel", "sublayers": ["attn", "mlp"],
               "bottleneck_size": 8, "phm_dim": 2}
    runs = []
    for checkpointing in (False, True):
        path = write_recipe(tmp_path / f"{checkpointing}.yaml", model=tiny_model_dir,
                            data=text_data["train"], out=tmp_path / f"run-{checkpointing}",
                            adapter=adapter, train={"max_steps": 4,
                                                    "gradient_checkpointing": checkpointing})
        runs.append(train_in_session(path)[3])
    assert runs[0][0] != runs[0][-1]  # the adapter trained
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)


def test_cli_train_eval_and_merge_on_a_run_directory(tmp_path, tiny_model_dir, text_data):
    """`peftune train` -> `peftune eval RUN_DIR` (and `--model BASE --adapter DIR`, the
    same model) works; `peftune merge RUN_DIR` exits 2 with one line and writes nothing."""
    from peftune.evaluate.targets import load_target, resolve_target

    adapter = {"method": "bottleneck", "placement": "parallel", "sublayers": ["mlp"],
               "bottleneck_size": 8}
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=tmp_path / "run", adapter=adapter, train={"max_steps": 10})
    done = _cli("train", recipe)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3]), losses

    done = _cli("eval", run, "--task", "perplexity", "--data", text_data["val"],
                "--compare", "base", "--out", tmp_path / "eval", "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    adapted, base = report["models"]
    assert adapted["method"] == "bottleneck" and adapted["adapter"].endswith("adapter")
    assert report["deltas"]["run - base"]["perplexity"]["loss"] < 0  # training helped

    by_run = load_target(resolve_target(str(run)), device=torch.device("cpu"))
    by_flags = load_target(resolve_target(None, model=str(tiny_model_dir),
                                          adapter=str(run / "adapter")),
                           device=torch.device("cpu"))
    torch.testing.assert_close(logits_of(by_flags.model, IDS), logits_of(by_run.model, IDS),
                               rtol=0, atol=0)

    done = _cli("merge", run)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "adapter.method bottleneck is not mergeable" in line, line
    assert "load_native_adapter" in line and "PeftModel" not in line, line
    assert not (run / "merged").exists()


# ---- bad input -------------------------------------------------------------------------------

def test_an_unrecognised_architecture_is_refused_naming_what_was_found(tmp_path):
    """GPT-NeoX calls its attention `attention`: refused at train time, exit 2, one line
    naming the block and its modules, nothing written."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from peftune.models import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    model = AutoModelForCausalLM.from_config(GPTNeoXConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=len(tokenizer), max_position_embeddings=128))
    with pytest.raises(InputError) as err:
        attach(model, BottleneckConfig(sublayers=["attn"]))
    (line,) = err.value.lines if hasattr(err.value, "lines") else [str(err.value)]
    assert "no attn sub-block in gpt_neox.layers.0 (GPTNeoXLayer, modules:" in line, line
    assert "attention" in line and "mlp" in line and "GPT-2" in line
    assert not hasattr(model, ATTRIBUTE)
    attach(model, BottleneckConfig(sublayers=["mlp"], bottleneck_size=4))  # its mlp is found

    neox = tmp_path / "neox"
    AutoModelForCausalLM.from_config(model.config).save_pretrained(neox)
    tokenizer.save_pretrained(neox)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": "alpha beta gamma"}) + "\n" for _ in range(8)))
    recipe = write_recipe(tmp_path / "r.yaml", model=neox, data=data, out=tmp_path / "run",
                          adapter={"method": "bottleneck", "sublayers": ["attn", "mlp"]})
    done = _cli("train", recipe)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: adapter.sublayers: no attn sub-block in gpt_neox.layers.0"), line
    assert not (tmp_path / "run").exists()


def test_a_model_without_a_layer_list_is_refused():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(InputError, match=r"found no list of decoder layers .*\(its modules: proj\)"):
        find_sub_blocks(Flat(), ["mlp"])


@pytest.mark.parametrize(("adapter", "expected"), [
    ({"method": "compacter", "bottleneck_size": 6, "phm_dim": 4},
     "adapter.phm_dim: 4 must divide the hidden size (32) and the bottleneck size (6)"),
    ({"method": "compacter", "phm_dim": 3, "reduction_factor": 4},
     "adapter.phm_dim: 3 must divide the hidden size (32) and the bottleneck size (8)"),
    ({"method": "bottleneck", "reduction_factor": 4, "bottleneck_size": 8},
     "give one of adapter.reduction_factor (4) and adapter.bottleneck_size (8), not both"),
    ({"method": "bottleneck", "reduction_factor": 64},
     "adapter.reduction_factor: reduction factor 64 leaves no bottleneck on hidden size 32"),
    ({"method": "bottleneck", "sublayers": ["mlp", "mlp"]}, "names a sub-block twice"),
    ({"method": "bottleneck", "sublayers": ["ffn"]}, "adapter.sublayers[0]: must be one of attn, mlp; got 'ffn'"),
    ({"method": "bottleneck", "placement": "inside"},
     "adapter.placement: must be one of series, parallel; got 'inside'"),
    ({"method": "bottleneck", "r": 8}, "adapter.r: unknown key for adapter method bottleneck"),
])
def test_recipe_refusals(tmp_path, tiny_model_dir, text_data, adapter, expected):
    line = recipe_refusal(tmp_path, model=tiny_model_dir, data=text_data["train"], adapter=adapter)
    assert expected.lower() in line.lower(), line


def test_sizes_are_checked_on_the_built_model_too():
    """A model without a local config.json (a hub id) is checked when the adapter attaches."""
    model = _tiny()
    with pytest.raises(InputError, match=r"adapter.phm_dim: 4 must divide the hidden size \(32\) "
                                         r"and the bottleneck size \(6\)"):
        attach(model, CompacterConfig(bottleneck_size=6, phm_dim=4))
    assert not hasattr(model, ATTRIBUTE)


def test_loader_refuses_another_base_and_other_directories(tmp_path):
    from peftune.adapters.bottleneck.model import export_bottleneck

    model = _tiny()
    config = BottleneckConfig(bottleneck_size=8)
    attach(model, config)
    export_bottleneck(model, tmp_path / "adapter", config=config)
    from transformers import AutoModelForCausalLM, LlamaConfig

    other = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        vocab_size=128))
    with pytest.raises(InputError, match="trained on a base with 2 layers of hidden size 32"):
        load_bottleneck(other, tmp_path / "adapter")
    assert not hasattr(other, ATTRIBUTE)
    with pytest.raises(InputError, match="not a bottleneck adapter directory"):
        load_bottleneck(_tiny(), tmp_path)
