"""The real packaged model (SmolLM2-135M-Instruct, pulled from the catalogue): what the tiny
models cannot show. A real tokenizer (49,152 tokens, BOS <|im_start|>, EOS <|im_end|>), a
tied output head, 30 layers, a real chat template.

One LoRA run (2 steps, every linear layer plus the tied lm_head) serves the export, merge
and eval checks; QLoRA and generation have their own. Skipped only where the package index
cannot be reached (the `real_model` fixture)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    REAL_MODEL,
    fp32_base,
    logits_of,
    read_jsonl,
    run_cli,
    train_in_session,
    write_jsonl,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def _rows() -> list[dict]:
    import inspect
    import textwrap

    functions = (json.dumps, json.loads, textwrap.dedent, textwrap.wrap, inspect.signature,
                 inspect.getdoc, math.isclose, Path.with_suffix)
    return [{"text": inspect.getdoc(f)} for f in functions]


def _recipe(tmp: Path, name: str, data: Path, **sections) -> Path:
    recipe = {
        "model": {"path": REAL_MODEL},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "target_modules": TARGETS},
        "data": {"train": str(data), "format": "text", "max_length": 64},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 5e-3, "log_every": 1,
                  "warmup_ratio": 0.0},
        "output": {"dir": str(tmp / name)},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _probe(tokenizer) -> torch.Tensor:
    text = "def greet(name):\n    return f'Hello, {name}!'  # The capital of France is Paris."
    return torch.tensor([tokenizer(text)["input_ids"]])


def _logits(model, ids) -> torch.Tensor:
    return logits_of(model, ids).float()


@pytest.fixture(scope="module")
def lora_run(real_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real-lora")
    data = write_jsonl(tmp / "docs.jsonl", _rows())
    recipe, built, summary, losses, out = train_in_session(_recipe(tmp, "run", data))
    ids = _probe(built.tokenizer)
    return {"out": out, "ids": ids, "trained": _logits(built.unwrapped_model, ids),
            "summary": summary, "losses": losses, "data": data, "tmp": tmp}


def test_lora_export_reproduces_the_trained_logits_in_plain_peft(real_model, lora_run):
    from peft import PeftModel

    out = lora_run["out"]
    assert all(math.isfinite(loss) for loss in lora_run["losses"])
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == real_model  # the converted directory
    assert "lm_head" in config["target_modules"]
    # the tied embedding is not copied into the adapter (peft would save 113 MB of it)
    assert (adapter / "adapter_model.safetensors").stat().st_size < 10_000_000
    loaded = PeftModel.from_pretrained(fp32_base(real_model), str(adapter))
    plain = _logits(loaded, lora_run["ids"])
    assert torch.allclose(plain, lora_run["trained"], atol=1e-4, rtol=0)
    base = _logits(fp32_base(real_model), lora_run["ids"])
    assert (plain - base).abs().max() > 1e-3  # the adapter did change the model
    # the run says which GGUF file, with its hash, the model came from
    source = lora_run["summary"]["model_source"]
    assert source["catalogue"] == REAL_MODEL and len(source["sha256"]) == 64
    assert source["sha256"] in (out / "recipe.yaml").read_text()


def test_merge_of_a_lora_on_the_tied_head_unties_it_and_matches_the_adapter(real_model,
                                                                           lora_run):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = lora_run["out"]
    merged = out / "merged"
    result = run_cli("merge", out, "--quiet")
    assert result.returncode == 0, result.stderr
    config = json.loads((merged / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert torch.allclose(_logits(model, lora_run["ids"]), lora_run["trained"], atol=2e-4, rtol=0)
    with safe_open(str(real_model / "model.safetensors"), framework="pt") as f:
        embedding = f.get_tensor("model.embed_tokens.weight")
    # the inputs keep the base embedding; only the head moved
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert not torch.equal(model.lm_head.weight, embedding)


@pytest.mark.slow  # the same computation is checked on the tiny model (test_eval.py)
def test_eval_perplexity_equals_a_direct_transformers_computation(real_model, lora_run, tmp_path):
    from transformers import AutoTokenizer

    from peftune.evaluate import resolve_target, run_eval
    from peftune.recipe.schema import EvalSection, EvalTask

    data = lora_run["data"]
    section = EvalSection(tasks=[EvalTask(task="perplexity", data=str(data))], batch_size=4)
    report = run_eval(targets=[resolve_target(None, model=REAL_MODEL)], config=section,
                      out=tmp_path / "eval", quiet=True)
    metrics = report["models"][0]["tasks"]["perplexity"]["metrics"]
    model, tokenizer = fp32_base(real_model).eval(), AutoTokenizer.from_pretrained(real_model)
    total, count = 0.0, 0
    for row in read_jsonl(data):
        # SmolLM2's tokenizer adds no BOS of its own; peftune follows the tokenizer
        ids = [*tokenizer(row["text"])["input_ids"], tokenizer.eos_token_id]
        tensor = torch.tensor([ids])
        with torch.no_grad():
            total += float(model(input_ids=tensor, labels=tensor).loss) * (len(ids) - 1)
        count += len(ids) - 1
    assert metrics["tokens"]["value"] == count
    assert abs(metrics["loss"]["value"] - total / count) < 1e-4
    assert 2 < metrics["perplexity"]["value"] < 200  # a real model, not a random one


@pytest.mark.slow  # QLoRA on CPU is covered on the tiny model (test_methods.py)
def test_qlora_nf4_trains_two_steps_on_the_real_model(real_model, lora_run):
    tmp = lora_run["tmp"]
    path = _recipe(tmp, "qlora", lora_run["data"], quant={"method": "nf4"},
                   adapter={"target_modules": "all-linear"})
    _, built, summary, losses, out = train_in_session(path)
    assert summary["steps"] == 2 and all(math.isfinite(loss) for loss in losses)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in built.unwrapped_model.modules())
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_the_real_model_answers_a_chat_question(real_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_model)
    model = fp32_base(real_model).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


CONVERSATIONS = [
    [{"role": "user", "content": "What does json.dumps return?"},
     {"role": "assistant", "content": "A str holding the JSON text."}],
    [{"role": "system", "content": "Answer in one line."},
     {"role": "user", "content": "Name a sorting function."},
     {"role": "assistant", "content": "sorted()"},
     {"role": "user", "content": "And one that sorts in place?"},
     {"role": "assistant", "content": "list.sort()"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "bye"}, {"role": "assistant", "content": "Goodbye."}],
]


def _expected_targets(tokenizer, ids) -> list[bool]:
    """Independently of peftune: a token is a target when its characters lie in an assistant
    turn's content or its closing `<|im_end|>\\n`, located in the rendered text."""
    import re

    text = tokenizer.decode(ids, skip_special_tokens=False)
    spans = [m.span(1) for m in re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>\n?)",
                                            text, re.DOTALL)]
    flags, position = [], 0
    for token in ids:
        piece = tokenizer.decode([token], skip_special_tokens=False)
        start, position = position, position + len(piece)
        flags.append(any(a <= start and position <= b for a, b in spans))
    assert position == len(text)
    return flags


@pytest.mark.parametrize("packing", [False, True])
def test_chat_labels_on_the_real_template_are_the_assistant_turns_only(real_model, tmp_path,
                                                                       packing):
    import numpy as np
    from transformers import AutoTokenizer

    from peftune.data import build_datasets, pack_rows
    from peftune.recipe.schema import DataSection

    tokenizer = AutoTokenizer.from_pretrained(real_model)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    splits = build_datasets(DataSection(train=str(data), format="chat", max_length=512,
                                        packing=packing), tokenizer, seed=0,
                            cache_dir=tmp_path / "cache")
    rows = pack_rows(splits.train, max_length=512, packing=packing, seed=0)
    assert len(rows) == (1 if packing else 3)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    seen = 0
    for row in rows:
        offset = 0
        for index, length in zip(row.example_indices, row.lengths, strict=True):
            ids = row.input_ids[offset:offset + length].tolist()
            labels = row.labels[offset:offset + length]
            offset += length
            messages = CONVERSATIONS[index]
            assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
            expected = _expected_targets(tokenizer, ids)
            assert [bool(x != -100) for x in labels] == expected  # token by token
            assert all(labels[i] == ids[i] for i in np.flatnonzero(labels != -100))
            # every assistant turn's <|im_end|> is a target, no other <|im_end|> is (SmolLM2's
            # template adds its default system turn when a conversation has none)
            roles = [m["role"] for m in messages]
            roles = roles if roles[0] == "system" else ["system", *roles]
            ends = [i for i, t in enumerate(ids) if t == end_of_turn]
            assert [bool(labels[i] != -100) for i in ends] == [r == "assistant" for r in roles]
            assert tokenizer.decode(np.asarray(ids)[labels != -100].tolist()) == "".join(
                f"{m['content']}<|im_end|>\n" for m in messages if m["role"] == "assistant")
            seen += 1
    assert seen == 3
