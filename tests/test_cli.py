"""The command line itself: tiny-model, methods, exit codes."""

from __future__ import annotations

from conftest import run_cli


def test_tiny_model_writes_a_loadable_model_and_chat_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tiny"
    result = run_cli("tiny-model", str(out), "--hidden-size", "48", "--layers", "3", "--heads", "4",
                     "--seed", "7")
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 48
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "héllo, wörld"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode()) and tokenizer.decode(ids) == text  # byte-level
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert (out / "model.safetensors").is_file()


def test_tiny_model_is_deterministic_for_a_seed(tmp_path):
    from safetensors.torch import load_file

    from peftune.models import build_tiny_model

    a = load_file(build_tiny_model(tmp_path / "a", hidden_size=32, seed=3) / "model.safetensors")
    b = load_file(build_tiny_model(tmp_path / "b", hidden_size=32, seed=3) / "model.safetensors")
    c = load_file(build_tiny_model(tmp_path / "c", hidden_size=32, seed=4) / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)


def test_tiny_model_refuses_a_non_empty_directory_and_bad_shapes(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("keep")
    result = run_cli("tiny-model", str(tmp_path / "x"))
    assert result.returncode == 2 and "not empty" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("tiny-model", str(tmp_path / "y"), "--hidden-size", "30", "--heads", "4")
    assert result.returncode == 2 and "multiple of --heads" in result.stderr
    assert not (tmp_path / "y").exists()


def test_methods_lists_lora_and_full():
    result = run_cli("methods")
    assert result.returncode == 0
    assert "lora" in result.stdout and "full" in result.stdout


def test_unknown_command_is_a_usage_error():
    result = run_cli("trian")
    assert result.returncode == 2
