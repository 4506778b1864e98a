"""`peftune merge` over quantized bases: a base that exists only as a bitsandbytes checkpoint
(nf4, int8) merges into its dequantized weights with a warning; a run trained over int4 (HQQ)
merges into the original fp32 weights; the recipe's model.trust_remote_code reaches every
load of the base during a merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TARGETS, logits_of, merge_in_process, write_recipe

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
WARNING = "holds only quantized weights: merging into their dequantized values"


def bnb_config(kind: str):
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def load_quantized(path: Path):
    """A saved bitsandbytes checkpoint as transformers loads it, with peftune's CPU fix for
    the AVX512-BF16 repacking (ENVIRONMENT.md) applied before any forward."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, device_map={"": "cpu"})
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


def dequantized_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every bitsandbytes layer's weight, dequantized with bitsandbytes' own primitives
    (independently of the merge, which goes through peft's helper)."""
    import bitsandbytes as bnb

    weights = {}
    for name, module in load_quantized(path).named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            weights[f"{name}.weight"] = bnb.functional.dequantize_4bit(
                weight.data, weight.quant_state).float()
        elif isinstance(module, bnb.nn.Linear8bitLt):  # LLM.int8(): W = CB · SCB / 127 per row
            weight = module.weight
            weights[f"{name}.weight"] = weight.data.float() * weight.SCB.float()[:, None] / 127
    return weights


def lora_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW = (alpha / r)·B·A per adapted weight, from the adapter's files."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert not config["use_rslora"] and not config["rank_pattern"] and not config["alpha_pattern"]
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    deltas = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            deltas[f"{module}.weight"] = scale * b.float() @ a.float()
    return deltas


def train_run(tmp: Path, model: Path, data: Path, name: str, **sections) -> Path:
    from peftune.recipe import load_recipe
    from peftune.train.run import run_train

    out = tmp / f"run-{name}"
    recipe = write_recipe(tmp / f"{name}.yaml", model=model, data=data, out=out,
                          adapter={"method": "lora", "r": 4, "alpha": 8, "target_modules": TARGETS},
                          train={"max_steps": 4}, **sections)
    run_train(load_recipe(recipe), quiet=True)
    return out


@pytest.fixture(scope="module")
def quantized_only(tmp_path_factory, tiny_model_dir, text_data) -> dict[str, dict]:
    """nf4 and int8 checkpoints saved by transformers + bitsandbytes (config.json has a
    quantization_config; no unquantized copy exists), each with a LoRA made over it: nf4's by
    `peftune train` (merged as RUN_DIR), int8's built with peft (merged with --base/--adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("quantized-only")
    made = {}
    for kind in ("nf4", "int8"):
        path = tmp / f"base-{kind}"
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config(kind),
                                             device_map={"": "cpu"}).save_pretrained(path)
        for name in TOKENIZER_FILES:
            shutil.copy(tiny_model_dir / name, path / name)
        assert "quantization_config" in json.loads((path / "config.json").read_text())
        made[kind] = {"base": path}
    run = train_run(tmp, made["nf4"]["base"], text_data["train"], "nf4",
                    quant={"method": "nf4", "compute_dtype": "float32"})
    made["nf4"].update(run=run, adapter=run / "adapter")
    torch.manual_seed(0)
    model = get_peft_model(load_quantized(made["int8"]["base"]),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init: give the adapter an effect to merge
            torch.nn.init.normal_(param, std=0.05)
    model.save_pretrained(tmp / "adapter-int8")
    made["int8"]["adapter"] = tmp / "adapter-int8"
    return made


# nf4's forward computes in fp32 on the dequantized weights (measured: 1.3e-7 from the merged
# model). int8's (LLM.int8()) also rounds the activations to 8 bits, so the quantized model +
# adapter differs from any fp32 weights by that rounding (measured: 2.1e-3, where the adapter
# moves the logits by 0.34).
@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize(("kind", "atol"), [("nf4", 1e-5), ("int8", 5e-3)])
def test_a_base_that_exists_only_quantized_merges_into_its_dequantized_weights(
        tmp_path, monkeypatch, capsys, quantized_only, kind, atol):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    made = quantized_only[kind]
    base, adapter, out = made["base"], made["adapter"], tmp_path / "merged"
    args = [str(made["run"])] if "run" in made else ["--base", str(base), "--adapter", str(adapter)]
    code, stdout, stderr = merge_in_process(monkeypatch, capsys, *args, "--out", str(out))
    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {base} {WARNING} (the unquantized original is not available)"]
    assert "Traceback" not in stderr and f"wrote {out}" in stdout
    assert "the original model" not in stdout + stderr  # no note contradicting the warning

    # transformers alone loads it, as a plain fp32 model
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(merged.config, "quantization_config", None) is None
    assert not getattr(merged, "is_quantized", False)
    linears = [m for m in merged.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 15 and all(type(m) is torch.nn.Linear for m in linears)

    # weights: dequantized(base) + ΔW at every adapted layer; every other tensor as stored
    written = load_file(out / "model.safetensors")
    dequantized, deltas = dequantized_weights(base), lora_deltas(adapter)
    assert set(deltas) == set(dequantized) and len(deltas) == 14
    for name, delta in deltas.items():
        assert delta.abs().max() > 1e-3, name  # the adapter was trained / set: ΔW is not zero
        torch.testing.assert_close(written[name], dequantized[name] + delta, rtol=0, atol=1e-6)
    stored = load_file(base / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(written[name], stored[name].float()), name
    assert all(t.dtype == torch.float32 for t in written.values())

    # logits: the quantized base + the adapter (what was trained and served before the merge)
    unmerged = logits_of(PeftModel.from_pretrained(load_quantized(base), str(adapter)))
    effect = (unmerged - logits_of(load_quantized(base))).abs().max()
    assert effect > 20 * atol  # the adapter moves the logits far beyond the tolerance
    torch.testing.assert_close(logits_of(merged), unmerged, rtol=0, atol=atol)

    report = json.loads((out / "merge_report.json").read_text())
    assert report["warnings"] == [warnings[0].removeprefix("warning: ")]
    assert report["mode"].startswith("peft merge_and_unload") and report["dtype"] == "float32"
    assert report["modules_changed"] == 14 and report["relative_delta_norm"] > 0
    assert report["trained_over"] == ("nf4" if "run" in made else "none")
    check = report["verification"]
    assert check["ok"] and check["how"].startswith("whole models")
    assert check["max_abs_logit_error"] < 1e-5 < check["adapter_effect_max_abs_logit"]
    assert not list(tmp_path.glob(".tmp-merge-*"))


def test_an_int4_run_merges_into_the_original_unquantized_weights(
        tmp_path, monkeypatch, capsys, tiny_model_dir, text_data):
    """int4 (HQQ) quantizes the base after loading, so the unquantized original is still at
    model.path: the plain-LoRA adapter streams into it, as for a QLoRA run."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = train_run(tmp_path, tiny_model_dir, text_data["train"], "int4",
                    quant={"method": "int4", "group_size": 32, "compute_dtype": "float32"})
    out = tmp_path / "merged"
    code, stdout, stderr = merge_in_process(monkeypatch, capsys, str(run), "--out", str(out))
    assert code == 0, stderr
    assert (f"note: trained over a int4 base; merging into the unquantized weights of "
            f"{tiny_model_dir} (the original model)") in stdout
    assert "warning: " not in stderr and "Traceback" not in stderr

    written = load_file(out / "model.safetensors")
    original = load_file(tiny_model_dir / "model.safetensors")
    deltas = lora_deltas(run / "adapter")
    assert set(written) == set(original) and len(deltas) == 14
    for name, weight in original.items():
        expected = weight.float() + deltas[name] if name in deltas else weight
        torch.testing.assert_close(written[name], expected, rtol=0, atol=1e-6)
        if name not in deltas:
            assert torch.equal(written[name], weight), name

    merged = logits_of(AutoModelForCausalLM.from_pretrained(out))
    fp32 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    unmerged = logits_of(PeftModel.from_pretrained(fp32, str(run / "adapter")))
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    base = logits_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert (merged - base).abs().max() > 1e-3
    report = json.loads((out / "merge_report.json").read_text())
    assert report["trained_over"] == "int4" and report["warnings"] == []
    assert report["mode"].startswith("streaming") and report["modules_changed"] == 14
    assert report["verification"]["ok"]


@pytest.fixture
def base_loads(monkeypatch) -> list[tuple[str, dict]]:
    """(path, kwargs) of every AutoModelForCausalLM.from_pretrained call."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained
    calls: list[tuple[str, dict]] = []

    def recording(path, *args, **kwargs):
        calls.append((str(path), kwargs))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    return calls


@pytest.mark.parametrize("trust", [True, False])
def test_the_merge_loads_a_quantized_only_base_with_the_recipes_trust_remote_code(
        tmp_path, monkeypatch, capsys, quantized_only, base_loads, trust):
    run = tmp_path / "run"
    shutil.copytree(quantized_only["nf4"]["run"], run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["model"]["trust_remote_code"] is False  # the default, as trained
    recipe["model"]["trust_remote_code"] = trust
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, _, stderr = merge_in_process(monkeypatch, capsys, str(run), "--out", str(tmp_path / "merged"))
    assert code == 0, stderr
    base = str(quantized_only["nf4"]["base"])
    loads = [kwargs for path, kwargs in base_loads if path == base]
    assert len(loads) == 2  # the merge and the verification's reference, both dequantized
    assert all(kwargs.get("trust_remote_code") is trust for kwargs in loads), loads


@pytest.mark.parametrize("dequantize", [False, True], ids=["unquantized", "quantized-only"])
@pytest.mark.parametrize("trust", [True, False])
def test_load_base_passes_trust_remote_code_on_both_paths(tiny_model_dir, quantized_only,
                                                          base_loads, dequantize, trust):
    from peftune.merge.whole_model import load_base

    base = quantized_only["int8"]["base"] if dequantize else tiny_model_dir
    model = load_base(base, dequantize=dequantize, trust_remote_code=trust)
    assert [path for path, _ in base_loads] == [str(base)]
    assert base_loads[0][1]["trust_remote_code"] is trust
    assert all(type(m) is torch.nn.Linear for m in model.modules()
               if isinstance(m, torch.nn.Linear))
    base_loads.clear()
    load_base(base, dequantize=dequantize)  # no recipe (--base/--adapter): off
    assert base_loads[0][1]["trust_remote_code"] is False


def test_training_over_a_saved_quantized_base_prepares_it_without_quant_in_the_recipe(
        quantized_only):
    """`quant: none` over a checkpoint saved in nf4: transformers loads it quantized anyway, so
    peftune must prepare it as it does a base it quantizes (the AVX512-BF16 repacking off,
    the base frozen), or LoRA gradients are corrupted after the first eval on such CPUs."""
    import bitsandbytes as bnb

    from peftune.models import load_model
    from peftune.recipe.schema import ModelSection, QuantSection

    model = load_model(ModelSection(path=str(quantized_only["nf4"]["base"])),
                       QuantSection(method="none"), device=torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(not m.support_avx512bf16_for_cpu for m in layers)
    assert not any(p.requires_grad for p in model.parameters())
