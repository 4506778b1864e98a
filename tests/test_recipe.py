"""Recipe loading: one test per bad input (the exact lines a user sees), `extends:`, overrides,
the resolved-YAML round trip, the analytic parameter count, and `peftune validate` staying
torch-free. Each test writes its recipes into its own tmp dir and runs from there, so the
file names in the messages are the short relative ones a user types."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import IMPORTTIME, REPO, imported_modules, run_cli

from peftune.errors import InputError
from peftune.recipe import estimate_parameters, load_recipe, recipe_to_yaml

GOOD = """\
model:
  path: ./models/tiny
data:
  train: data/train.jsonl
train:
  max_steps: 10
"""
HEAVY = {"torch", "transformers", "datasets"}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def write(name: str, text: str) -> Path:
    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def problems(text: str | None, *overrides: str, name: str = "recipe.yaml") -> list[str]:
    """The lines load_recipe raises for `text` written to `name` (None: the file is absent)."""
    if text is not None:
        write(name, text)
    with pytest.raises(InputError) as err:
        load_recipe(name, list(overrides))
    return err.value.lines


def cli(*args: str, importtime: bool = False):
    return run_cli(*args, python_args=IMPORTTIME if importtime else (), timeout=120,
                   env={"COLUMNS": "200", "PYTHONPATH": str(REPO)})


# --- bad input: exact lines ------------------------------------------------------------


def test_unknown_key_suggests_the_closest_through_the_cli():
    write("recipe.yaml", GOOD + "  epochz: 3\n")
    result = cli("validate", "recipe.yaml")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: recipe.yaml:7: train.epochz: unknown key (did you mean epochs?)"]
    assert "Traceback" not in result.stderr


def test_unknown_section_suggests_the_closest():
    assert problems(GOOD + "trian:\n  lr: 1\n") == [
        "recipe.yaml:7: trian: unknown section (did you mean train?)"]


def test_wrong_type_shows_the_value():
    assert problems(GOOD + "  lr: abc\n") == ["recipe.yaml:7: train.lr: expected a number, got 'abc'"]


def test_literal_lists_the_allowed_values():
    assert problems(GOOD + "  scheduler: cosin\n") == [
        "recipe.yaml:7: train.scheduler: must be one of cosine, linear, constant; "
        "got 'cosin' (did you mean cosine?)"]


def test_missing_data_train_points_at_the_data_section():
    text = "model:\n  path: ./m\ndata:\n  format: text\n"
    assert problems(text) == ["recipe.yaml:3: data.train: required key is missing "
                              "(training data: jsonl | json | parquet | csv | saved datasets dir)"]


def test_missing_model_path():
    text = "model:\n  dtype: auto\ndata:\n  train: t.jsonl\n"
    assert problems(text) == ["recipe.yaml:1: model.path: required key is missing "
                              "(local directory or hub id of the base model)"]


def test_missing_sections_point_at_line_1():
    assert problems("train:\n  lr: 1\n") == [
        "recipe.yaml:1: model: required section is missing (it needs path)",
        "recipe.yaml:1: data: required section is missing (it needs train)"]


def test_yaml_syntax_error_names_its_line_through_the_cli():
    write("recipe.yaml", "model:\n  path: ./m\ndata:\n  train: [a, b\ntrain:\n  lr: 1\n")
    result = cli("validate", "recipe.yaml")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: recipe.yaml:5: YAML syntax error: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence on line 4)"]


def test_top_level_must_be_a_mapping():
    assert problems("- a\n- b\n") == [
        "recipe.yaml:1: the recipe must be a mapping of sections (model:, data:, train:, ...), "
        "got [a, b]"]


def test_python_tags_are_refused():
    assert problems("model: !!python/object/apply:os.system [ls]\n") == [
        "recipe.yaml:1: YAML error: the tag !!python/object/apply:os.system is not allowed: a "
        "recipe holds plain values (it is read with YAML's safe loader and never builds Python "
        "objects); remove the tag"]


def test_missing_recipe_file_through_the_cli():
    result = cli("validate", "nope.yaml")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: nope.yaml: no such recipe file"]


def test_extends_target_missing():
    lines = problems("extends: ../base.yaml\n" + GOOD, name="sub/recipe.yaml")
    resolved = (Path("sub") / "../base.yaml").resolve()
    assert lines == [f"sub/recipe.yaml:1: extends: no such file ../base.yaml (resolved to {resolved})"]


def test_extends_only_one_level():
    write("grand.yaml", GOOD)
    write("base.yaml", "# parent\nextends: grand.yaml\n")
    assert problems("extends: base.yaml\n") == [
        "base.yaml:2: extends: base.yaml itself extends grand.yaml; only one level of extends "
        "is allowed (copy what recipe.yaml needs into base.yaml)"]


def test_unknown_adapter_method_lists_the_choices():
    from peftune.adapters.registry import method_names

    assert problems(GOOD + "adapter:\n  method: loar\n") == [
        f"recipe.yaml:8: adapter.method: unknown method 'loar'; choose one of: "
        f"{', '.join(method_names())} (did you mean lora?)"]


def test_unknown_adapter_key_names_the_method():
    assert problems(GOOD + "adapter:\n  method: lora\n  alhpa: 8\n") == [
        "recipe.yaml:9: adapter.alhpa: unknown key for adapter method lora (did you mean alpha?)"]
    assert problems(GOOD + "adapter:\n  method: lora\n  rank: 8\n") == [
        "recipe.yaml:9: adapter.rank: unknown key for adapter method lora; valid keys: method, "
        "target_modules, modules_to_save, r, alpha, dropout, rslora, dora, bias"]


def test_switching_method_names_the_leftover_keys():
    from peftune.adapters.registry import all_methods

    owners = sorted(m.name for m in all_methods() if "r" in m.config.model_fields)
    assert problems(GOOD + "adapter:\n  r: 16\n", "adapter.method=full") == [
        "recipe.yaml:8: adapter.r: unknown key for adapter method full; r is a key of "
        f"{', '.join(owners[:4])} and {len(owners) - 4} more methods (remove it when "
        "switching methods)"]


def test_nf4_with_full_fine_tuning():
    lines = problems(GOOD + "quant:\n  method: nf4\nadapter:\n  method: full\n")
    assert lines == ["recipe.yaml:8: quant.method: nf4 cannot be combined with adapter.method: "
                     "full (it trains weights of the base, which a quantized base freezes); use "
                     "quant.method: none, or a method that trains over nf4, such as lora"]


@pytest.mark.parametrize(("key", "value", "shown"), [
    ("max_steps", "0", "0"), ("max_steps", "-5", "-5"), ("lr", "0.0", "0"),
    ("lr", "-1.0e-4", "-0.0001"), ("batch_size", "0", "0"), ("batch_size", "-2", "-2"),
])
def test_non_positive_numbers(key, value, shown):
    text = "model: ./m\ndata:\n  train: t.jsonl\ntrain:\n" + f"  {key}: {value}\n"
    assert problems(text) == [f"recipe.yaml:5: train.{key}: must be > 0, got {shown}"]


@pytest.mark.parametrize("value", ["[0.9]", "[0.9, 1.5]", "[0.9, 0.99, 0.999]", "0.9",
                                   "[-0.1, 0.9]", "[.nan, 0.9]", "[true, 0.9]", "[a, b]"])
def test_adam_betas_is_one_line_naming_the_key_the_range_and_an_example(value):
    text = "model: ./m\ndata:\n  train: t.jsonl\ntrain:\n" + f"  adam_betas: {value}\n"
    assert problems(text) == [
        "recipe.yaml:5: train.adam_betas: expected two numbers in [0, 1) (Adam's beta1 and "
        f"beta2), e.g. [0.9, 0.999], got {value}"]
    assert problems(GOOD, f"train.adam_betas={value}") == [  # as an override, the same line
        f"override 'train.adam_betas={value}': train.adam_betas: expected two numbers in "
        f"[0, 1) (Adam's beta1 and beta2), e.g. [0.9, 0.999], got {value}"]
    write("good.yaml", GOOD + "  adam_betas: [0, 0.95]\n")
    assert load_recipe("good.yaml").train.adam_betas == (0.0, 0.95)


def test_several_errors_at_once_through_the_cli():
    write("recipe.yaml", """\
        model:
          dtype: bf16
        data:
          train: t.jsonl
          max_lenght: 512
        train:
          batch_size: 0
          lr: fast
        adapter:
          r: 1.5
        """)
    result = cli("validate", "recipe.yaml", "train.epochs=many")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: recipe.yaml:1: model.path: required key is missing "
        "(local directory or hub id of the base model)",
        "error: recipe.yaml:2: model.dtype: must be one of auto, float32, bfloat16, float16; "
        "got 'bf16' (did you mean bfloat16?)",
        "error: recipe.yaml:5: data.max_lenght: unknown key (did you mean max_length?)",
        "error: recipe.yaml:7: train.batch_size: must be > 0, got 0",
        "error: recipe.yaml:8: train.lr: expected a number, got 'fast'",
        "error: recipe.yaml:10: adapter.r: expected an integer, got 1.5",
        "error: override 'train.epochs=many': train.epochs: expected a number, got 'many'",
    ]


def test_override_with_a_bad_type_through_the_cli():
    write("recipe.yaml", GOOD)
    result = cli("validate", "recipe.yaml", "adapter.r=abc")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: override 'adapter.r=abc': adapter.r: expected an integer, got 'abc'"]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("override", ["train.lr", "=3", "train..lr=1", "train.=1"])
def test_malformed_override(override):
    assert problems(GOOD, override) == [
        f"override {override!r}: expected KEY.PATH=VALUE, such as train.lr=1e-4 or data.val=null"]


def test_override_of_an_unknown_key():
    assert problems(GOOD, "train.epochz=3") == [
        "override 'train.epochz=3': train.epochz: unknown key (did you mean epochs?)"]


def test_override_inside_a_scalar():
    assert problems(GOOD, "train.max_steps.x=1") == [
        "override 'train.max_steps.x=1': train.max_steps: is 10, not a mapping, "
        "so train.max_steps.x cannot be set"]


def test_override_with_invalid_yaml():
    assert problems(GOOD, "adapter.target_modules=[q_proj") == [
        "override 'adapter.target_modules=[q_proj': adapter.target_modules: the value is not "
        "valid YAML: expected ',' or ']', but got '<stream end>'"]


def test_duplicate_key():
    assert problems(GOOD + "  lr: 1.0e-4\n  max_steps: 20\n") == [
        "recipe.yaml:8: train.max_steps: duplicate key (first given on line 6)"]


def test_union_field_gets_one_line():
    assert problems(GOOD + "adapter:\n  target_modules: 5\n") == [
        "recipe.yaml:8: adapter.target_modules: expected a string or a list, got 5"]
    assert problems(GOOD + "adapter:\n  target_modules: [q_proj, 7]\n") == [
        "recipe.yaml:8: adapter.target_modules[1]: expected a string, got 7"]


# --- good input --------------------------------------------------------------------------


def test_extends_deep_merges_and_reports_parent_lines():
    write("recipes/base.yaml", """\
        model:
          path: ./m
          dtype: bfloat16
        data:
          train: t.jsonl
        train:
          lr: 3.0e-4
          batch_size: 4
          scheduler: cosin
        adapter:
          target_modules: [q_proj]
        """)
    write("recipes/child.yaml", """\
        extends: base.yaml
        train:
          batch_size: 16
        adapter:
          target_modules: [v_proj]
        """)
    assert problems(None, name="recipes/child.yaml") == [
        "recipes/base.yaml:9: train.scheduler: must be one of cosine, linear, constant; "
        "got 'cosin' (did you mean cosine?)"]
    recipe = load_recipe("recipes/child.yaml", ["train.scheduler=linear"])
    assert (recipe.model.dtype, recipe.train.lr, recipe.train.batch_size) == ("bfloat16", 3e-4, 16)
    assert recipe.adapter.target_modules == ["v_proj"]  # lists replace, never concatenate
    assert recipe.model.path == "./m"  # paths are not rewritten relative to the recipe


def test_overrides_are_typed():
    write("recipe.yaml", "model: ./m\ndata:\n  train: t.jsonl\n  val: v.jsonl\ntrain:\n  lr: 0.1\n")
    recipe = load_recipe("recipe.yaml", [
        "adapter.r=32", "train.lr=1e-4", "adapter.target_modules=[q_proj, v_proj]",
        "data.val=null", "model.trust_remote_code=true",
    ])
    assert recipe.adapter.r == 32 and isinstance(recipe.adapter.r, int)
    assert recipe.train.lr == 1e-4 and isinstance(recipe.train.lr, float)
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    assert recipe.data.val is None
    assert recipe.model.trust_remote_code is True
    assert type(recipe.adapter).__name__ == "LoraConfig"


def test_model_shorthand_and_adapter_method_config():
    write("recipe.yaml", "model: ./m\ndata:\n  train: t.jsonl\nadapter:\n  method: full\n")
    recipe = load_recipe("recipe.yaml", ["model.dtype=float32"])
    assert (recipe.model.path, recipe.model.dtype) == ("./m", "float32")
    assert type(recipe.adapter).__name__ == "FullConfig"


def test_empty_section_means_defaults_and_shorthand_merges():
    write("base.yaml", "model: ./m\ndata:\n  train: t.jsonl\n")
    write("recipe.yaml", "extends: base.yaml\nmodel:\n  dtype: float16\nquant:\n  # method: nf4\n")
    recipe = load_recipe("recipe.yaml")
    assert (recipe.model.path, recipe.model.dtype, recipe.quant.method) == ("./m", "float16", "none")


def test_val_and_val_ratio_conflict():
    assert problems(GOOD.replace("data:\n", "data:\n  val: v.jsonl\n  val_ratio: 0.1\n")) == [
        "recipe.yaml:5: data.val_ratio: give either data.val (a file) or data.val_ratio, not both"]


def test_recipe_to_yaml_round_trips():
    write("base.yaml", GOOD + "  lr: 1e-4\n  adam_betas: [0.9, 0.95]\n")
    write("recipe.yaml", "extends: base.yaml\ndata:\n  prompt_template: \"Q: {prompt}\\nA: \"\n")
    recipe = load_recipe("recipe.yaml", ["adapter.r=4", "adapter.target_modules=[q_proj]"])
    text = recipe_to_yaml(recipe)
    assert "extends" not in text
    assert list(__import__("yaml").safe_load(text)) == ["model", "quant", "adapter", "data",
                                                        "train", "output"]
    write("resolved.yaml", text)
    again = load_recipe("resolved.yaml")
    assert again == recipe
    assert recipe_to_yaml(again) == text
    assert again.adapter.model_dump() == recipe.adapter.model_dump()


def test_validate_prints_the_recipe_and_trainable_count_without_torch(tiny_model_dir):
    import json

    from peftune.adapters.specs import LoraConfig

    write("recipe.yaml", f"model:\n  path: {tiny_model_dir}\ndata:\n  train: t.jsonl\n"
                         "train:\n  batch_size: 4\n  grad_accum: 2\n")
    result = cli("validate", "recipe.yaml", "adapter.r=4", importtime=True)
    assert result.returncode == 0, result.stderr
    assert not imported_modules(result.stderr) & HEAVY
    config = json.loads((tiny_model_dir / "config.json").read_text())
    total, trainable = estimate_parameters(config, LoraConfig(r=4))
    assert "r: 4" in result.stdout and "grad_accum: 2" in result.stdout
    assert f"{trainable:,} (" in result.stdout and f"{total:,}" in result.stdout
    assert "8 (batch_size 4 × grad_accum 2 × 1 process)" in result.stdout


def test_help_does_not_import_torch():
    result = cli("--help", importtime=True)
    assert result.returncode == 0
    assert "validate" in result.stdout
    assert not imported_modules(result.stderr) & HEAVY


# --- analytic parameter count against the real model ---------------------------------------


def _real_counts(model, lora_targets) -> tuple[int, int]:
    import peft

    total = sum(p.numel() for p in model.parameters())
    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=lora_targets))
    return total, sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_count_parameters_matches_the_tiny_model(tiny_model_dir):
    import json

    from transformers import AutoModelForCausalLM

    from peftune.adapters.specs import FullConfig, LoraConfig

    config = json.loads((tiny_model_dir / "config.json").read_text())
    total, lora_trainable = _real_counts(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                         "all-linear")
    assert estimate_parameters(config, FullConfig()) == (total, total)
    assert estimate_parameters(config, LoraConfig(r=8)) == (total, lora_trainable)


@pytest.mark.parametrize(("model_type", "extra", "targets"), [
    ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}, "all-linear"),
    ("llama", {"head_dim": 16}, ["q_proj", "v_proj", "lm_head"]),
    ("mistral", {}, ["self_attn.o_proj", "down_proj", "embed_tokens"]),
    ("qwen2", {}, "all-linear"),
    ("qwen3", {"attention_bias": True}, "all-linear"),
])
def test_count_parameters_across_architectures(model_type, extra, targets):
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftune.adapters.specs import FullConfig, LoraConfig

    config = AutoConfig.for_model(model_type, vocab_size=97, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, **extra)
    total, trainable = _real_counts(AutoModelForCausalLM.from_config(config), targets)
    as_json = config.to_dict()
    assert estimate_parameters(as_json, FullConfig()) == (total, total)
    assert estimate_parameters(as_json, LoraConfig(r=8, target_modules=targets)) == (total, trainable)


def test_count_parameters_unknown_architecture():
    from peftune.adapters.specs import LoraConfig

    assert estimate_parameters({"model_type": "gpt2", "n_embd": 32}, LoraConfig()) is None


def test_non_finite_numbers_and_incomplete_selection_are_refused(tmp_path):
    from peftune.errors import InputError
    from peftune.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("model: m\ndata:\n  train: t.jsonl\n  select: {method: dsir}\n"
                    "train:\n  lr: .inf\n  adam_betas: [0.9, 1.5]\n")
    with pytest.raises(InputError) as err:
        load_recipe(path)
    text = "\n".join(err.value.lines)
    assert "train.lr" in text and "adam_betas" in text
    path.write_text("model: m\ndata:\n  train: t.jsonl\n  select: {method: dsir}\n")
    with pytest.raises(InputError, match="r.yaml:4: data.select.k: required key is missing"):
        load_recipe(path)
