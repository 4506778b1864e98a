"""`peftune export`: a run or model written as one GGUF file (Llama and Qwen2), read back by
gguf's reader and transformers' GGUF loader; f16/bf16 exact, q8_0/q4_0 within their bounds;
the Ollama Modelfile; every refusal (exit 2, one line, nothing written); and the round trip
on the real model (slow): SmolLM2 GGUF -> LoRA -> export f16 -> model.path -> same logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    IMPORTTIME,
    fp32_base,
    imported_modules,
    logits_of,
    main_in_process,
    run_cli,
    write_recipe,
)

from peftune.errors import InputError, TrainingError
from peftune.export.runner import run_export
from peftune.merge.runner import run_merge


def train_run(tmp: Path, model: Path, data: Path, name: str, adapter: dict,
              quant: str = "none", lr: float = 2e-2) -> Path:
    from peftune.recipe import load_recipe
    from peftune.train.run import run_train

    out = tmp / name
    sections = {"quant": {"method": quant, "compute_dtype": "float32"}} if quant != "none" else {}
    recipe = write_recipe(tmp / f"{name}.yaml", model=model, data=data, out=out, adapter=adapter,
                          train={"max_steps": 3, "lr": lr}, **sections)
    if adapter["method"] == "prompt":
        recipe.write_text(recipe.read_text().replace("max_length: 64",
                                                     "max_length: 64\n  packing: false"))
    run_train(load_recipe(recipe), quiet=True)
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, text_data) -> Path:
    return train_run(tmp_path_factory.mktemp("export-runs"), tiny_model_dir, text_data["train"],
                     "lora", {"method": "lora", "r": 4, "alpha": 8})


@pytest.fixture(scope="module")
def f16_export(tmp_path_factory, lora_run) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("export") / "tiny-f16.gguf"
    return run_export(target=str(lora_run), outtype="f16", out=out, ollama=True, quiet=True), out


def gguf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path.resolve()),
                                                dtype=torch.float32)


def test_f16_export_has_the_merged_models_logits(tmp_path, f16_export, lora_run, tiny_model_dir):
    report, path = f16_export
    merged = tmp_path / "merged16"
    run_merge(target=str(lora_run), out=merged, dtype="float16", quiet=True)
    exported = logits_of(gguf_model(path))  # transformers alone; llama's Q/K rows undone by it
    torch.testing.assert_close(exported, logits_of(fp32_base(merged)), rtol=0, atol=1e-5)
    assert (exported - logits_of(fp32_base(tiny_model_dir))).abs().max() > 1e-3  # the adapter
    check = report["verification"]
    assert check["ok"] and check["relative_logit_error"] < 1e-4 and check["bound"] == 1e-4
    assert check["rounding_relative_logit_error"] == 0  # merged in f16: nothing left to round
    assert report["merge"]["dtype"] == "float16" and report["merge"]["verification"]["ok"]
    assert not list(path.parent.glob(".tmp-export-*"))


def test_metadata_and_tensors_read_back_with_ggufs_reader(f16_export, tiny_model_dir):
    from gguf import GGMLQuantizationType, GGUFReader
    from transformers import AutoTokenizer

    _, path = f16_export
    reader = GGUFReader(path)

    def field(key):
        return reader.get_field(key).contents()

    config = json.loads((tiny_model_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert field("general.architecture") == "llama" and field("general.name") == "lora"
    assert field("llama.block_count") == 2 and field("llama.embedding_length") == 32
    assert field("llama.attention.head_count") == 4 and field("llama.attention.head_count_kv") == 2
    assert field("llama.feed_forward_length") == 64 and field("llama.vocab_size") == 261
    assert field("llama.rope.dimension_count") == 8
    assert field("llama.context_length") == config["max_position_embeddings"]
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.tokens") == [vocab[i] for i in range(261)]
    types = field("tokenizer.ggml.token_type")
    assert types[tokenizer.convert_tokens_to_ids("<|im_end|>")] == 3  # control
    assert types[100] == 1  # a byte
    assert field("tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field("tokenizer.ggml.add_bos_token") is True  # the tiny tokenizer prepends <s>
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 9 + 3  # per block 7 matrices + 2 norms; embedding, norm, output
    assert tensors["blk.0.attn_q.weight"].tensor_type == GGMLQuantizationType.F16
    assert tensors["blk.1.ffn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    assert list(tensors["token_embd.weight"].shape) == [32, 261]  # ggml order: columns first
    assert "output.weight" in tensors  # the tiny model's head is not tied


def test_modelfile_converts_the_chat_template_and_stops_at_end_of_turn(f16_export, capsys):
    report, path = f16_export
    text = (path.parent / "Modelfile").read_text()
    assert "FROM ./tiny-f16.gguf\n" in text
    assert ('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
            '{{ end }}<|im_start|>assistant\n"""') in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "</s>"' in text
    assert "SYSTEM" not in text  # the tiny template has no default system prompt
    assert report["modelfile"] == str(path.parent / "Modelfile")


def test_a_default_system_prompt_becomes_system_and_other_templates_are_refused(tiny_model_dir):
    from transformers import AutoTokenizer

    from peftune.export.modelfile import chat_pieces, modelfile_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = (  # SmolLM2's: a system turn is inserted when there is none
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are SmolLM.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    pieces = chat_pieces(tokenizer)
    assert pieces.default_system == "You are SmolLM." and pieces.lead == ""
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}]
    assert pieces.render(conversation) == tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True)
    assert 'SYSTEM """You are SmolLM."""' in modelfile_text("m.gguf", tokenizer, add_bos=False)
    tokenizer.chat_template = "{{ messages[-1]['content'] }}"  # the last message only
    with pytest.raises(InputError, match="write the Modelfile's TEMPLATE by hand"):
        chat_pieces(tokenizer)


@pytest.mark.parametrize(("outtype", "matrix", "bound"), [
    ("bf16", "BF16", 3e-2), ("q8_0", "Q8_0", 0.1), ("q4_0", "Q4_0", 0.6)])
def test_bf16_and_quantized_exports_are_exact_and_within_their_rounding_bound(
        tmp_path, lora_run, outtype, matrix, bound):
    from gguf import GGUFReader

    out = tmp_path / f"tiny-{outtype}.gguf"
    report = run_export(target=str(lora_run), outtype=outtype, out=out, quiet=True)
    check = report["verification"]
    assert check["ok"] and check["relative_logit_error"] < 1e-4  # the file holds what was meant
    assert check["rounding_bound"] == bound and check["rounding_relative_logit_error"] <= bound
    if outtype != "bf16":  # merged in fp32, then rounded to blocks of 32 at 8 / 4 bits
        assert check["rounding_relative_logit_error"] > 1e-4
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.ffn_up.weight"] == types["token_embd.weight"] == matrix
    assert types["output.weight"] == ("Q8_0" if outtype == "q4_0" else matrix)  # head kept finer
    assert types["output_norm.weight"] == "F32"


def test_the_card_lists_every_export_in_its_directory_and_leaves_a_foreign_readme(
        tmp_path, f16_export, lora_run):
    report, f16 = f16_export
    card = f16.parent / "README.md"
    assert report["card"] == str(card)
    text = card.read_text()
    assert f"# {lora_run.name} (GGUF)" in text and f"the training run `{lora_run}`" in text
    assert "| `tiny-f16.gguf` | f16 |" in text and "ollama create tiny-f16 -f" in text
    assert 'gguf_file="tiny-f16.gguf"' in text and "final validation loss" in text
    assert str(lora_run / "README.md") in text  # the run's own card

    # a second export into a directory lists both files; a deleted one drops out
    shutil.copytree(f16.parent, tmp_path / "both")
    q8 = run_export(target=str(lora_run), outtype="q8_0", out=tmp_path / "both" / "tiny-q8.gguf",
                    quiet=True)
    text = Path(q8["card"]).read_text()
    assert "| `tiny-f16.gguf` | f16 |" in text and "| `tiny-q8.gguf` | q8_0 |" in text
    assert 'gguf_file="tiny-q8.gguf"' in text
    (tmp_path / "both" / "tiny-f16.gguf").unlink()
    (tmp_path / "both" / "tiny-q8.gguf").unlink()
    again = run_export(target=str(lora_run), outtype="q8_0",
                       out=tmp_path / "both" / "tiny-q8.gguf", quiet=True)
    assert "tiny-f16.gguf" not in Path(again["card"]).read_text()

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("my notes\n")
    mine = run_export(target=str(lora_run), outtype="q8_0", out=tmp_path / "mine" / "m.gguf",
                      quiet=True)
    assert mine["card"] is None and (tmp_path / "mine" / "README.md").read_text() == "my notes\n"


def test_a_qwen2_model_exports_as_it_is(tmp_path):
    from peftune.models import build_tiny_model

    model = build_tiny_model(tmp_path / "qwen", arch="qwen2", hidden_size=32, layers=2, heads=4)
    out = tmp_path / "qwen-f16.gguf"
    report = run_export(target=str(model), outtype="f16", out=out, quiet=True)
    check = report["verification"]
    assert report["architecture"] == "qwen2" and check["ok"] and check["relative_logit_error"] < 1e-4
    assert 0 < check["rounding_relative_logit_error"] <= 5e-3  # fp32 weights rounded to f16
    exported, original = logits_of(gguf_model(out)), logits_of(fp32_base(model))
    assert 0 < (exported - original).abs().max() < 5e-3 * original.abs().max()


def test_a_run_over_a_4bit_base_exports_the_original_weights_plus_the_adapter(
        tmp_path, tiny_model_dir, text_data):
    from peft import PeftModel

    run = train_run(tmp_path, tiny_model_dir, text_data["train"], "nf4",
                    {"method": "lora", "r": 4, "alpha": 8}, quant="nf4")
    out = tmp_path / "nf4.gguf"
    report = run_export(target=str(run), outtype="f16", out=out, quiet=True)
    assert report["merge"]["trained_over"] == "nf4" and report["verification"]["ok"]
    expected = logits_of(PeftModel.from_pretrained(fp32_base(tiny_model_dir), str(run / "adapter")))
    assert (logits_of(gguf_model(out)) - expected).abs().max() < 5e-3 * expected.abs().max()


def test_a_wrong_file_fails_verification_and_leaves_nothing(tmp_path, lora_run, monkeypatch):
    from peftune.export import gguf_writer

    # without llama's Q/K row reordering transformers reads a different model back
    monkeypatch.setattr(gguf_writer, "interleave_rope_halves", lambda weight, heads: weight)
    out = tmp_path / "wrong.gguf"
    with pytest.raises(TrainingError, match="export verification failed: the GGUF file's logits "
                       r"\(as transformers loads it\) differ from the merged model's"):
        run_export(target=str(lora_run), outtype="f16", out=out, ollama=True, quiet=True)
    assert list(tmp_path.iterdir()) == []  # no file, no Modelfile, no staging directory


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory, tiny_model_dir, text_data) -> Path:
    return train_run(tmp_path_factory.mktemp("export-prompt"), tiny_model_dir, text_data["train"],
                     "prompt", {"method": "prompt", "num_virtual_tokens": 4})


@pytest.fixture(scope="module")
def gpt_neox_dir(tmp_path_factory, tiny_model_dir) -> Path:
    other = tmp_path_factory.mktemp("arch") / "neox"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    return other


@pytest.mark.parametrize(("args", "expected"), [
    (["{lora}", "--outtype", "q5_k"], "--outtype q5_k: unsupported; choose one of f16, bf16, q8_0"),
    (["{lora}", "--format", "onnx"], "--format onnx: unsupported; the export format is gguf"),
    (["{neox}", "--out", "{tmp}/o.gguf"], "{neox}: model_type 'gpt_neox' cannot be exported to "
     "GGUF; supported architectures: llama (Llama family, SmolLM2 included), qwen2 (Qwen2)"),
    (["{lora}", "--out", "{tmp}/exists.gguf"], "--out {tmp}/exists.gguf: exists; pass --overwrite"),
    (["{prompt}", "--out", "{tmp}/o.gguf"], "adapter.method prompt cannot be merged into the "
     "weights, so it cannot be written as one GGUF file; evaluate or serve it as an adapter "
     "instead (peftune eval {prompt})"),
    (["{base}"], "--out: required when exporting a model"),
    (["{lora}", "--out", "{tmp}/o.bin"], "--out {tmp}/o.bin: a GGUF file name ends in .gguf"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys,
                                                            lora_run, prompt_run, gpt_neox_dir,
                                                            tiny_model_dir, args, expected):
    (tmp_path / "exists.gguf").write_text("keep")
    names = {"tmp": tmp_path, "lora": lora_run, "prompt": prompt_run, "neox": gpt_neox_dir,
             "base": tiny_model_dir}
    monkeypatch.delenv("PEFTUNE_DEBUG", raising=False)
    code, _, err = main_in_process(capsys, "export", *[a.format(**names) for a in args])
    (line,) = err.strip().splitlines()
    assert code == 2 and line.startswith("error: ") and expected.format(**names) in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf"]
    assert (tmp_path / "exists.gguf").read_text() == "keep"
    assert not (lora_run / "export").exists() and not (prompt_run / "export").exists()


def test_export_help_does_not_import_torch():
    result = run_cli("export", "--help", python_args=IMPORTTIME, timeout=120)
    assert result.returncode == 0 and "--outtype" in result.stdout
    assert not imported_modules(result.stderr) & {"torch", "transformers", "gguf", "peft"}


@pytest.mark.slow  # the real model: a LoRA, an export, a merge and a GGUF conversion (~2 min)
def test_real_model_round_trip_through_gguf(tmp_path, real_model, text_data, monkeypatch):
    from transformers import AutoTokenizer

    from peftune.merge import verify
    from peftune.models import resolve_model_path

    run = train_run(tmp_path, real_model, text_data["train"], "real",
                    {"method": "lora", "r": 8, "alpha": 16}, lr=1e-3)  # the quickstart's rate
    out = tmp_path / "smollm2-f16.gguf"
    report = run_export(target=str(run), outtype="f16", out=out, ollama=True, quiet=True)
    assert report["verification"]["ok"] and report["pre_tokenizer"] == "smollm"
    assert report["tokens"] == 49152 and report["merges"] > 48000
    assert report["tensors"] == {"F16": 30 * 7 + 1, "F32": 30 * 2 + 1}  # tied head: no output
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in (tmp_path / "Modelfile").read_text()
    merged = tmp_path / "merged16"
    run_merge(target=str(run), out=merged, dtype="float16", quiet=True)

    monkeypatch.setenv("PEFTUNE_MODELS", str(tmp_path / "models"))  # the conversion goes here
    converted = Path(resolve_model_path(str(out), quiet=True))  # peftune's own GGUF source path
    reference_tokenizer = AutoTokenizer.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(converted)  # rebuilt from the file's vocabulary
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    for text in [*verify.PROBES, reference_tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True)]:
        assert tokenizer(text)["input_ids"] == reference_tokenizer(text)["input_ids"], text
    assert tokenizer.chat_template == reference_tokenizer.chat_template
    ids = torch.tensor([reference_tokenizer("The capital of France is")["input_ids"]])
    torch.testing.assert_close(logits_of(fp32_base(converted), ids),
                               logits_of(fp32_base(merged), ids), rtol=0, atol=1e-4)
    shutil.rmtree(tmp_path / "models")  # 0.5 GB
