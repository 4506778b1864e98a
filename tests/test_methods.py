"""The method matrix: one row per registered adapter method, over the tiny model on CPU.

Each row trains through the real `peftune train` path, then checks what the method
promises: the loss falls; the exported artifact, loaded by peft / transformers alone on
the original base, reproduces the trained model's logits; merged logits equal unmerged
ones where the method is mergeable; plain-LoRA exports are plain LoRA adapters; and the
method trains over an nf4 base where its registration says so (elsewhere the recipe is
refused before anything loads); and it trains with dpo on preference pairs, its reference
had the way `reference: auto` should have it. The validate-time parameter estimate equals
the real count wherever it gives one.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    IDS,
    NO_DEBUG,
    logits_of,
    main_in_process,
    read_metrics,
    run_cli,
    train_in_session,
    write_recipe,
)

from peftune.adapters.registry import all_methods, get_method, method_names
from peftune.errors import InputError
from peftune.recipe import estimate_parameters, load_recipe

# Keys that fit the tiny model (hidden 32, MLP 64, 2 KV heads of 8), and a learning rate
# at which a few steps show (virtual tokens and rescaling vectors need larger ones).
ROWS: dict[str, dict] = {
    "lora": {"r": 4},
    "rslora": {"r": 4},
    "dora": {"r": 4},
    "pissa": {"r": 4},
    "olora": {"r": 4},
    "corda": {"r": 4, "calibration": {"examples": 8}},
    "eva": {"r": 4, "tau": 0.9, "calibration": {"examples": 8}},
    "lora-ga": {"r": 4, "calibration": {"examples": 8}},
    "loftq": {"r": 4},
    "adalora": {"init_r": 6, "target_r": 4},
    "vera": {"r": 16},
    "vblora": {"vector_length": 16, "num_vectors": 32},
    "randlora": {"r": 8},
    "miss": {"r": 4},
    "bone": {"r": 4},
    "shira": {"r": 4},
    "lokr": {"r": 4},
    "loha": {"r": 4},
    "oft": {},
    "boft": {},
    "hra": {"r": 4},
    "ia3": {},
    "prompt": {"num_virtual_tokens": 4},
    "prefix": {"num_virtual_tokens": 4},
    "ptuning": {"num_virtual_tokens": 4},
    "poly": {"r": 4, "n_skills": 2},
    "mhr": {"r": 4, "n_skills": 2, "n_splits": 2},
    "full": {},
    "freeze": {"layers": 1},
    # native bottleneck adapters (peftune.adapters.bottleneck)
    "bottleneck": {"sublayers": ["attn", "mlp"], "bottleneck_size": 8},
    "compacter": {"sublayers": ["attn", "mlp"], "bottleneck_size": 8, "phm_dim": 4},
    # native (peftune.adapters.lowrank)
    "sora": {"r": 4, "sparsity": 1.0},
    "dylora": {"r": 4, "min_rank": 3, "export_rank": 3},
    "dyrank": {"r": 6, "target_r": 3},
    "slora": {"r": 4},
    "nlora": {"r": 4},
    "inttune": {"r": 4},
    "lora-sb": {"r": 4, "calibration": {"examples": 8}},
    "lamda": {"r": 4},
    "svfit": {"r": 4},
    "loldu": {"r": 4},
    "nola": {"r": 4, "num_basis": 8},
    "s2lora": {"r": 4},
    "sorsa": {"r": 4},
    "hydra": {"r": 4},
    "mos": {"r": 4},
    "lora-sp": {"r": 4},
    "increlora": {"init_r": 2, "max_r": 4, "target_r": 3, "alpha": 8, "warmup_steps": 1,
                  "add_interval": 2},
    "aflora": {"r": 4, "warmup": 0.0, "final": 0.3},  # projections freeze within the run
    "mola": {"r": 2, "experts": 4, "top_k": 2, "router_aux_loss": 0.01},
    # sparse (peftune.adapters.sparse)
    "paca": {"columns": 4},
    "fish": {"density": 0.05, "calibration": {"examples": 8}},
    "lt-sft": {"density": 0.05, "full_steps": 3},
    "spiel": {"density": 0.05, "update_interval": 3},
    "dsee": {"r": 4, "density": 0.02},
}
LR = {"ia3": 0.2, "prompt": 0.3, "prefix": 0.1, "ptuning": 0.05, "vera": 0.05, "full": 2e-3,
      "inttune": 0.1, "svfit": 0.1, "loldu": 0.1, "lora-sb": 0.1, "nola": 0.1}


def test_every_registered_method_has_a_row():
    assert sorted(ROWS) == method_names()


def _recipe(tmp_path: Path, model: Path, data: dict, method: str, quant: str = "none",
            steps: int = 8, objective: str = "sft", lr: float | None = None) -> Path:
    spec = get_method(method)
    needs_rows = spec.config.model_fields.get("num_virtual_tokens") is not None
    sections: dict = {
        "adapter": {"method": method, **ROWS[method]},
        "train": {"max_steps": steps, "lr": lr or LR.get(method, 2e-2)},
    }
    data_keys = None
    if objective != "sft":  # a preference objective, on pairs
        sections["train"]["objective"] = objective
        data_keys = {"format": "preference"}
    if method == "loftq" and quant == "none":
        quant = "nf4"  # loftq is a QLoRA init: it only exists over a 4-bit base
    if quant != "none":
        sections["quant"] = {"method": quant, "compute_dtype": "float32"}
    if quant == "int4":
        sections["quant"]["group_size"] = 32  # divides the tiny model's widths (32, 64)
    path = write_recipe(tmp_path / f"{method}-{quant}.yaml", model=model, data=data["train"],
                        out=tmp_path / f"run-{method}-{quant}", data_keys=data_keys, **sections)
    if needs_rows:  # virtual tokens need one example per row
        path.write_text(path.read_text().replace("max_length: 64", "max_length: 64\n  packing: false"))
    return path


def _base(recipe):
    """The base model as a user would load it, with the recipe's quantization."""
    from peftune.models import load_model

    return load_model(recipe.model, recipe.quant, device=torch.device("cpu"))


def _reload(recipe, adapter_dir: Path):
    """The exported adapter on a fresh base: by peft, or (native adapters: bottleneck /
    Compacter, the sparse methods, which are not PEFT's) by peftune's own loader."""
    from peft import PeftModel

    from peftune.adapters.native import is_native_adapter, load_native_adapter

    if is_native_adapter(adapter_dir):
        return load_native_adapter(_base(recipe), adapter_dir)
    return PeftModel.from_pretrained(_base(recipe), adapter_dir)


def _extra(method: str) -> dict:
    return {"task_ids": torch.zeros(1, dtype=torch.long)} if method in ("poly", "mhr") else {}


@pytest.mark.parametrize("method", sorted(ROWS))
def test_method_trains_exports_reloads_and_merges(tmp_path, tiny_model_dir, text_data, method):
    from transformers import AutoModelForCausalLM

    spec = get_method(method)
    quant = "nf4" if method == "loftq" else "none"
    recipe, built, summary, losses, out = train_in_session(_recipe(tmp_path, tiny_model_dir, text_data,
                                                         method, quant))
    assert sum(losses[-2:]) < sum(losses[:2]), losses  # it learns
    trained = logits_of(built.unwrapped_model, **_extra(method))

    if spec.trains_base_weights:
        assert not (out / "adapter").exists()
        loaded = AutoModelForCausalLM.from_pretrained(out / "model")
        torch.testing.assert_close(logits_of(loaded), trained, rtol=0, atol=1e-5)
        return
    # peft alone, on the base as it was before the method touched it
    loaded = _reload(recipe, out / "adapter")
    # residual inits are re-expressed on the original W: equal up to float rounding
    atol = 1e-4 if getattr(recipe.adapter, "rewrites_base", False) else 1e-5
    unmerged = logits_of(loaded, **_extra(method))
    torch.testing.assert_close(unmerged, trained, rtol=0, atol=atol)
    # and training changed the model (virtual-token methods return their positions first)
    assert (unmerged[:, -IDS.shape[1]:] - logits_of(_base(recipe))).abs().max() > 1e-4

    if spec.exports_plain_lora:
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["init_lora_weights"] is True
        assert not config.get("use_dora")
    if spec.mergeable and quant == "none":
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(logits_of(merged), unmerged, rtol=0, atol=1e-4)


NF4 = [m for m in sorted(ROWS) if "nf4" in get_method(m).quantized]
# fp4 uses the same bitsandbytes layer as nf4; int8 and int4 (HQQ) layers are peft's others
QUANTIZED = [(m, q) for q in ("nf4", "int8", "int4") for m in sorted(ROWS)
             if q in get_method(m).quantized]


def _one_row_per_implementation(rows: list[tuple], keep: tuple[str, ...] = ()) -> list:
    """`rows` ((method, *rest) tuples) as parameters: the default run keeps, per `rest`, the
    first method of each implementation (`apply` function) plus the methods in `keep`; the
    other rows, which take the same code path, are marked slow (make test-all)."""
    seen = set()
    params = []
    for method, *rest in rows:
        path = (get_method(method).apply, *rest)
        kept = path not in seen or method in keep
        seen.add(path)
        params.append(pytest.param(method, *rest, marks=() if kept else pytest.mark.slow))
    return params


def _quantized_rows() -> list:
    """Every (method, quantization) pair; per quantization the default run keeps one method
    per implementation plus LoRA and LoftQ (its own 4-bit init)."""
    return _one_row_per_implementation(QUANTIZED, keep=("lora", "loftq"))


@pytest.mark.parametrize(("method", "quant"), _quantized_rows())
def test_method_trains_over_a_quantized_base(tmp_path, tiny_model_dir, text_data, method, quant):
    recipe, built, _, losses, out = train_in_session(_recipe(tmp_path, tiny_model_dir, text_data, method,
                                                   quant, steps=6))
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    loaded = _reload(recipe, out / "adapter")
    torch.testing.assert_close(logits_of(loaded, **_extra(method)),
                               logits_of(built.unwrapped_model, **_extra(method)),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", [m for m in sorted(ROWS) if m not in NF4])
def test_methods_that_cannot_train_over_nf4_are_refused_at_validate(tmp_path, tiny_model_dir,
                                                                    text_data, method):
    with pytest.raises(InputError) as err:
        load_recipe(_recipe(tmp_path, tiny_model_dir, text_data, method, "nf4"))
    (line,) = err.value.lines
    assert "quant.method: nf4 cannot be combined with adapter.method: " + method in line
    assert get_method(method).unquantized_because in line


@pytest.mark.parametrize("method", sorted(ROWS))
def test_validate_estimate_equals_the_real_count(tmp_path, tiny_model_dir, text_data, method):
    from peftune.adapters.common import count_parameters
    from peftune.train.setup import build_training

    recipe = load_recipe(_recipe(tmp_path, tiny_model_dir, text_data, method))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    estimate = estimate_parameters(config, recipe.adapter)
    if estimate is None:
        pytest.skip(f"{method}: counted at train start only")  # e.g. EVA redistributes ranks
    base_total = count_parameters(_base(recipe))[1]
    assert estimate == (base_total, build_training(recipe, quiet=True).trainable_params)


def test_methods_table_lists_every_method_with_its_keys():
    done = run_cli("methods", timeout=60, env={"COLUMNS": "400", "PATH": ""}, inherit_env=False)
    assert done.returncode == 0, done.stderr
    for spec in all_methods():
        row = next(line for line in done.stdout.splitlines() if f" {spec.name} " in line)
        assert spec.paper.split(",")[0] in row
        for key in spec.keys[:2]:
            assert key in row


# ---- preference objectives -----------------------------------------------------------------



# peft's own adapters, which peft's disable_adapter() switches off (the others are peftune's)
PEFT_BACKED = ("peftune.adapters.lora.model:apply_lora", "peftune.adapters.tuners.model:apply_tuner")
# Inits whose switched-off adapter is not the starting model besides those that rewrite W or
# prepend virtual tokens: LoftQ starts from the 4-bit W plus its error in A·B, and VB-LoRA's A
# and B are both drawn from a random vector bank.
STARTS_AWAY_FROM_THE_BASE = ("loftq", "vblora")
DPO_LR = {"loldu": 0.02}  # its sft rate (0.1) overshoots the pairs' margins


def _reference_of(method: str) -> str:
    """How `reference: auto` should get a method's reference: the adapter switched off where
    that gives the starting model, else precomputed."""
    spec = get_method(method)
    switchable = spec.apply in PEFT_BACKED and not spec.trains_base_weights
    starts_at_the_base = not (getattr(spec.config, "rewrites_base", False)
                              or "num_virtual_tokens" in spec.config.model_fields
                              or method in STARTS_AWAY_FROM_THE_BASE)
    return "adapter_off" if switchable and starts_at_the_base else "precomputed"


@pytest.mark.parametrize("method", _one_row_per_implementation([(m,) for m in sorted(ROWS)]))
def test_method_trains_with_dpo(tmp_path, tiny_model_dir, pair_data, method):
    """Every method trains with dpo: `reference: auto` picks the way it should, the first
    step's loss is ln 2 (policy == reference), the pairs are learnt, the artifact written.
    Calibrated inits (CorDA, EVA, LoRA-GA) calibrate on the pairs' sequences, one a row."""
    _, _, summary, losses, out = train_in_session(_recipe(
        tmp_path, tiny_model_dir, pair_data, method, steps=4, objective="dpo",
        lr=DPO_LR.get(method)))
    assert summary["objective"]["reference"] == _reference_of(method)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    margins = [r["reward_margin"] for r in read_metrics(out) if "loss" in r]
    assert losses[-1] < losses[0] or margins[-1] > margins[0], (losses, margins)
    artifact = out / ("model" if get_method(method).trains_base_weights else "adapter")
    assert list(artifact.glob("*.safetensors")), sorted(p.name for p in out.iterdir())


def test_virtual_tokens_come_before_each_example_of_a_pair(tmp_path, tiny_model_dir, pair_data):
    """A pair shares its row; prompt tuning scores each of its examples as if alone, after
    its own virtual tokens (sequence_logps gives them a row each)."""
    from peftune.train.loss import sequence_logps
    from peftune.train.setup import build_training

    built = build_training(load_recipe(_recipe(tmp_path, tiny_model_dir, pair_data, "prompt",
                                               objective="dpo")), quiet=True)
    model, batch = built.unwrapped_model, built.batches_for_epoch(0)[0]
    assert (batch["segment_ids"][0] == 1).any()  # the first row holds a whole pair
    logps, lengths = sequence_logps(model, batch)
    for example in range(len(batch["roles"])):
        where = batch["segment_ids"] == example
        ids, labels = batch["input_ids"][where], batch["labels"][where]
        logits = model(input_ids=ids[None], use_cache=False).logits[0, -len(ids):-1]
        scored = labels[1:] != -100
        alone = torch.log_softmax(logits.float(), -1)[scored].gather(1, labels[1:][scored, None])
        torch.testing.assert_close(logps[example], alone.sum(), rtol=1e-5, atol=1e-4)
        assert lengths[example] == scored.sum()


# ---- training strategies -------------------------------------------------------------------

def test_loraplus_gives_b_matrices_ratio_times_the_learning_rate(tmp_path, tiny_model_dir,
                                                                 text_data):
    from peftune.train.setup import build_training

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", model=tiny_model_dir,
                                      data=text_data["train"], out=tmp_path / "run",
                                      train={"loraplus_ratio": 16, "lr": 1e-3}))
    built = build_training(recipe, quiet=True)
    lr_of = {id(p): group["lr"] for group in built.optimizer.param_groups for p in group["params"]}
    names = dict(built.unwrapped_model.named_parameters())
    rates = {("lora_B" in n): lr_of[id(p)] for n, p in names.items() if p.requires_grad}
    assert rates == {True: pytest.approx(16e-3), False: pytest.approx(1e-3)}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", model=tiny_model_dir,
                                      data=text_data["train"], out=tmp_path / "run",
                                      train={"loraplus_ratio": 16, "weight_decay": 0.1}))
    decays = {group["weight_decay"] for group in build_training(recipe, quiet=True).optimizer.param_groups
              if group["params"]}
    assert decays == {0.1}  # LoRA+ keeps train.weight_decay (peft's default would be 0)


def test_lora_on_the_head_alone_and_prompt_tuning_from_text(tmp_path, tiny_model_dir, text_data):
    """Explicit targets may name the head (peft's LoRA takes it); prompt tuning starts from
    the embeddings of init_text, read with the model's own tokenizer."""
    for adapter in ({"method": "lora", "r": 4, "target_modules": ["lm_head"]},
                    {"method": "prompt", "init": "text", "init_text": "alpha beta"}):
        path = write_recipe(tmp_path / f"{adapter['method']}.yaml", model=tiny_model_dir,
                            data=text_data["train"], out=tmp_path / adapter["method"],
                            adapter=adapter, train={"max_steps": 2})
        if adapter["method"] == "prompt":
            path.write_text(path.read_text().replace("max_length: 64", "max_length: 64\n  packing: false"))
        recipe, built, _, losses, _ = train_in_session(path)
        assert built.trainable_params > 0 and len(losses) == 2
    prompt = built.unwrapped_model.prompt_encoder["default"].embedding.weight
    words = built.tokenizer("alpha beta", add_special_tokens=False)["input_ids"]
    start = built.unwrapped_model.get_input_embeddings()(torch.tensor(words))
    assert prompt.shape[0] == 20 and not torch.equal(prompt[: len(words)], start)  # it trained


def test_freeze_estimate_on_a_tied_model_counts_the_shared_tensor_once(tmp_path, tiny_model_dir,
                                                                       text_data):
    from safetensors.torch import load_file, save_file

    from peftune.adapters.common import count_parameters

    tied = tmp_path / "tied"  # the tiny model with its head tied to the embeddings
    shutil.copytree(tiny_model_dir, tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    weights = load_file(tied / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tied / "model.safetensors", metadata={"format": "pt"})
    for adapter in ({"method": "freeze", "head": True}, {"method": "freeze", "layers": 1,
                                                          "modules": ["lm_head.weight"]}):
        recipe = load_recipe(write_recipe(tmp_path / "r.yaml", model=tied, data=text_data["train"],
                                          out=tmp_path / "run", adapter=adapter))
        total, trainable = estimate_parameters({**config, "tie_word_embeddings": True}, recipe.adapter)
        from peftune.train.setup import build_training

        built = build_training(recipe, quiet=True)
        assert (total, trainable) == (count_parameters(_base(recipe))[1], built.trainable_params)


# ---- bad input -----------------------------------------------------------------------------

def _problems(tmp_path, tiny_model_dir, text_data, *, adapter: dict, **sections) -> list[str]:
    path = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                        out=tmp_path / "run", adapter=adapter, **sections)
    with pytest.raises(InputError) as err:
        load_recipe(path)
    return [line.split(": ", 1)[1] for line in err.value.lines]  # without the file:line


@pytest.mark.parametrize(("adapter", "sections", "expected"), [
    ({"method": "vera", "alpha": 8}, {}, "adapter.alpha: unknown key for adapter method vera"),
    ({"method": "vera", "dora": True}, {},
     "adapter.dora: unknown key for adapter method vera; dora is a key of"),
    ({"method": "adalora", "init_r": 4, "target_r": 8}, {},
     "adapter.target_r (8) must not exceed adapter.init_r (4)"),
    ({"method": "prompt"}, {}, "data.packing: adapter.method prompt prepends virtual tokens"),
    ({"method": "loftq"}, {}, "adapter.method: loftq initialises LoRA from the quantization error"),
    ({"method": "vera"}, {"train": {"loraplus_ratio": 16}},
     "train.loraplus_ratio: LoRA+ raises the learning rate of LoRA's B matrices"),
    ({"method": "freeze"}, {}, "adapter.method freeze trains nothing"),
    ({"method": "pissa"}, {"quant": {"method": "int8"}},
     "quant.method: int8 cannot be combined with adapter.method: pissa (its init rewrites"),
    ({"method": "lorra"}, {}, "adapter.method: unknown method 'lorra'; choose one of: adalora,"),
    ({"method": "pissa", "dora": True}, {}, "adapter.dora: adapter.method pissa sets the adapter"),
    ({"method": "pissa", "modules_to_save": ["lm_head"]}, {},
     "adapter.modules_to_save: pissa's export is converted into a plain LoRA"),
    ({"method": "corda", "bias": "all"}, {}, "adapter.bias: corda's export is converted"),
    ({"method": "adalora", "tinit": 4, "tfinal": 2}, {},
     "adapter.tfinal: adapter.tinit + adapter.tfinal (4 + 2) leave no pruning steps in a run of 6"),
    ({"method": "ptuning", "encoder_dropout": 0.1}, {},
     "adapter.encoder_dropout only applies to encoder_type: LSTM"),
    ({"method": "loftq"}, {"quant": {"method": "int4"}},
     "quant.method: int4 cannot be combined with adapter.method: loftq"),
])
def test_recipe_refusals(tmp_path, tiny_model_dir, text_data, adapter, sections, expected):
    (line,) = _problems(tmp_path, tiny_model_dir, text_data, adapter=adapter, **sections)
    assert line.startswith(expected) or expected in line, line


@pytest.mark.parametrize(("adapter", "expected"), [
    ({"method": "lora", "target_modules": ["qkv"]},
     "adapter.target_modules: ['qkv'] matches no linear layer of the model; its linear layers "
     "are: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    ({"method": "lora", "target_modules": ["q_proj", "value"]},
     "adapter.target_modules: 'value' matches no layer of the model; its linear layers are: "
     "down_proj, gate_proj"),
    ({"method": "dora", "r": 24}, "adapter.r: 24 is larger than layer model.layers.0.self_attn.k_proj "
     "(32 x 16) allows; use at most 16"),
    ({"method": "vblora", "vector_length": 24},
     "adapter.vector_length: 24 must divide the dimensions of every targeted layer"),
    ({"method": "freeze", "layers": 3}, "adapter.layers: 3 is more than the model's 2 decoder layers"),
    ({"method": "freeze", "modules": ["model.layer.*"]}, "adapter.modules: 'model.layer.*' matches no parameter"),
    ({"method": "lora", "modules_to_save": ["nothing"]},
     "adapter.modules_to_save: ['nothing'] matches no module of the model"),
    ({"method": "oft", "block_size": 12}, "adapter.block_size: 12 must divide the input width"),
])
def test_model_dependent_refusals_exit_2_and_write_nothing(tmp_path, tiny_model_dir, text_data,
                                                            adapter, expected, capsys,
                                                            monkeypatch):
    """The first refusal through a real `peftune train` process, the others through the same
    entry point in this process (a fresh interpreter per row costs seconds of imports)."""
    path = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                        out=tmp_path / "run", adapter=adapter)
    if adapter.get("target_modules") == ["qkv"]:
        done = run_cli("train", path, timeout=120, env=NO_DEBUG)
        code, err = done.returncode, done.stderr
    else:
        monkeypatch.delenv("PEFTUNE_DEBUG", raising=False)
        code, _, err = main_in_process(capsys, "train", path)
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and expected in line, line
    assert not (tmp_path / "run").exists()


def test_docs_list_every_method():
    rows = (Path(__file__).parent.parent / "docs" / "methods.md").read_text()
    for name in method_names():
        assert f"| `{name}` |" in rows, name


def test_one_wrong_target_name_is_refused_on_the_built_model_too(tiny_model_dir):
    """A hub model has no config.json for validate to read: the built model is checked."""
    from transformers import AutoModelForCausalLM

    from peftune.adapters.lora.configs import LoraConfig
    from peftune.adapters.targets import peft_targets
    from peftune.errors import InputError

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(InputError, match=r"adapter.target_modules: 'value' matches no layer"):
        peft_targets(model, LoraConfig(method="lora", target_modules=["q_proj", "value"]))
    assert peft_targets(model, LoraConfig(method="lora", target_modules=["q_proj", "v_proj"])) \
        == ["q_proj", "v_proj"]
