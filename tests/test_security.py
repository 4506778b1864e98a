"""Safety defaults: remote code off unless a recipe says so (and a warning when on), weights
from safetensors only unless `model.allow_pickle: true`, no recipe value ever imported or
evaluated, and YAML read with the safe loader (a `!!python/...` tag is one error line and
nothing runs)."""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, main_in_process, make_text_rows, write_jsonl

from peftune.errors import InputError

PACKAGE = REPO / "peftune"


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("peftune.models.loading.WARNED_REMOTE_CODE", set())
    write_jsonl(tmp_path / "train.jsonl", make_text_rows(16))
    return tmp_path


def recipe(path: Path, model: Path | str, **model_keys) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"path": str(model), **model_keys},
        "adapter": {"method": "lora", "r": 2}, "data": {"train": "train.jsonl", "max_length": 32},
        "train": {"max_steps": 1, "batch_size": 2}, "output": {"dir": "out/run"}}))
    return path


# --- trust_remote_code ------------------------------------------------------------------


def test_remote_code_and_pickle_are_off_unless_the_recipe_says_so(workdir, tiny_model_dir):
    from peftune.recipe import load_recipe, recipe_to_yaml

    loaded = load_recipe(recipe(workdir / "r.yaml", tiny_model_dir))
    assert loaded.model.trust_remote_code is False and loaded.model.allow_pickle is False
    saved = yaml.safe_load(recipe_to_yaml(loaded))["model"]
    assert saved["trust_remote_code"] is False and saved["allow_pickle"] is False
    on = load_recipe(recipe(workdir / "on.yaml", tiny_model_dir, allow_pickle=True))
    assert on.model.allow_pickle is True


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_reaches_every_from_pretrained(trust, workdir, tiny_model_dir,
                                                         monkeypatch, capsys):
    """Config, tokenizer and model loads all get the recipe's value; the model load also
    gets use_safetensors=True. When it is true, one warning line is printed (once)."""
    import torch
    import transformers

    from peftune.models import load_model_and_tokenizer
    from peftune.recipe.schema import ModelSection, QuantSection

    calls = []
    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        cls = getattr(transformers, name)
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, kwargs))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    model_cfg = ModelSection(path=str(tiny_model_dir), trust_remote_code=trust)
    load_model_and_tokenizer(model_cfg, QuantSection(), device=torch.device("cpu"))
    assert {name for name, _ in calls} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    assert all(kwargs.get("trust_remote_code") is trust for _, kwargs in calls), calls
    assert all(kwargs.get("use_safetensors") is True
               for name, kwargs in calls if name == "AutoModelForCausalLM")
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if "trust_remote_code" in line]
    assert len(warnings) == (1 if trust else 0), warnings
    if trust:
        assert warnings[0].startswith("warning: model.trust_remote_code is true")


def test_the_cli_warns_in_one_line_when_remote_code_is_trusted(workdir, tiny_model_dir, capsys):
    path = recipe(workdir / "r.yaml", tiny_model_dir)
    code, _, err = main_in_process(capsys, "validate", str(path))
    assert code == 0 and "trust_remote_code" not in err
    code, out, err = main_in_process(capsys, "validate", str(path), "model.trust_remote_code=true")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 0 and "trust_remote_code: true" in out
    assert lines == [f"warning: model.trust_remote_code is true: loading {tiny_model_dir} runs "
                     "the Python code shipped with it; set it only for a model you trust"]


# --- safetensors only --------------------------------------------------------------------


@pytest.fixture
def pickle_model(tmp_path, tiny_model_dir) -> Path:
    """The tiny model with its weights as pytorch_model.bin only (a pickle file)."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, out)
    (out / "model.safetensors").unlink()
    torch.save(load_file(tiny_model_dir / "model.safetensors"), out / "pytorch_model.bin")
    return out


def test_a_pickle_only_model_is_refused_unless_allowed(workdir, pickle_model, tiny_model_dir,
                                                       capsys):
    import torch

    from peftune.models import load_model
    from peftune.recipe.schema import ModelSection, QuantSection

    path = recipe(workdir / "r.yaml", pickle_model)
    before = sorted(p.name for p in workdir.iterdir())
    code, _, err = main_in_process(capsys, "train", str(path))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "model.path" in lines[0] and "pytorch_model.bin" in lines[0]
    assert "model.allow_pickle: true" in lines[0]
    assert sorted(p.name for p in workdir.iterdir()) == before  # no output directory

    cpu = torch.device("cpu")
    allowed = load_model(ModelSection(path=str(pickle_model), allow_pickle=True), QuantSection(),
                         device=cpu)
    reference = load_model(ModelSection(path=str(tiny_model_dir)), QuantSection(), device=cpu)
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.equal(allowed(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_a_pickle_only_adapter_is_refused_unless_allowed(tmp_path):
    from peftune.models import check_weights_format

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04N.")  # pickle of None
    with pytest.raises(InputError) as err:
        check_weights_format(adapter, allow_pickle=False, key="--adapter", weights="adapter")
    assert err.value.lines[0].startswith(f"--adapter: {adapter} has adapter weights only as "
                                         "pickle (adapter_model.bin)")
    assert "model.allow_pickle: true" in err.value.lines[0]
    check_weights_format(adapter, allow_pickle=True, key="--adapter")  # allowed: no error
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    check_weights_format(adapter, allow_pickle=False, key="--adapter")  # safetensors present


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node, node.func.attr, ast.unparse(node.func.value)


def test_every_load_in_the_package_keeps_the_safety_flags():
    """A static guard over peftune/: every Auto*.from_pretrained of a model passes
    use_safetensors, no call hard-codes trust_remote_code=True, torch.load is weights_only,
    and YAML is only ever read with the safe loader."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, attr, owner in _calls(tree):
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            keys = {kw.arg: kw.value for kw in node.keywords}
            trust = keys.get("trust_remote_code")
            if isinstance(trust, ast.Constant) and trust.value is True:
                problems.append(f"{where}: trust_remote_code=True")
            if attr == "from_pretrained" and owner.startswith("AutoModel") \
                    and "use_safetensors" not in keys:
                problems.append(f"{where}: {owner}.from_pretrained without use_safetensors")
            if attr == "load" and owner == "torch" and not (
                    isinstance(keys.get("weights_only"), ast.Constant)
                    and keys["weights_only"].value is True):
                problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "yaml" and attr in ("load", "load_all", "unsafe_load", "full_load"):
                problems.append(f"{where}: yaml.{attr}")
            if owner == "yaml" and attr in ("Loader", "UnsafeLoader", "FullLoader"):
                problems.append(f"{where}: yaml.{attr}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "yaml" and node.attr in ("Loader", "UnsafeLoader",
                                                                   "FullLoader", "unsafe_load"):
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: yaml.{node.attr}")
    assert not problems, "\n".join(problems)


# --- recipes cannot run code ---------------------------------------------------------------


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system [\"touch {marker}\"]",
    "!!python/object/new:subprocess.Popen [[\"touch\", \"{marker}\"]]",
    "!!python/name:os.system",
    "!!python/module:os",
])
def test_python_tags_are_refused_and_nothing_runs(tag, workdir, tiny_model_dir, capsys):
    marker = workdir / "pwned"
    path = workdir / "r.yaml"
    path.write_text(f"model:\n  path: {tiny_model_dir}\nadapter:\n  method: "
                    f"{tag.format(marker=marker)}\ndata:\n  train: train.jsonl\n")
    code, _, err = main_in_process(capsys, "train", str(path))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"error: {path}:4: YAML error: the tag !!python/")
    assert "is not allowed" in lines[0]
    assert not marker.exists() and not (workdir / "out").exists()


@pytest.mark.parametrize("override, key", [
    ("adapter.method=os:system", "adapter.method"),
    ("adapter.method=peftune_probe_module:run", "adapter.method"),
    ("adapter.method=peftune.adapters.lora.LoraConfig", "adapter.method"),
    ("data.format=peftune_probe_module", "data.format"),
    ("quant.method=builtins:eval", "quant.method"),
    ("train.optimizer=torch.optim:SGD", "train.optimizer"),
    ("model.attn_implementation=peftune_probe_module:kernel", "model.attn_implementation"),
])
def test_recipe_values_are_never_imported(override, key, workdir, tiny_model_dir, monkeypatch,
                                          capsys):
    """Names resolve only through peftune's registries and fixed choices: a value that looks
    like an import path is an unknown name, and a module it names is never imported."""
    marker = workdir / "imported"
    (workdir / "peftune_probe_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef run(*a):\n    pass\n")
    monkeypatch.syspath_prepend(str(workdir))
    path = recipe(workdir / "r.yaml", tiny_model_dir)
    code, _, err = main_in_process(capsys, "train", str(path), override)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"override {override!r}: {key}:" in lines[0]
    assert not marker.exists() and "peftune_probe_module" not in sys.modules
