"""The CUDA paths: QLoRA (nf4) training on a GPU with bf16 compute, bf16 autocast chosen by
`precision: auto`, and the chunked loss equal to the plain one on the GPU.

Marked `gpu`: skipped by default (`make test`), run with `python3 -m pytest -m gpu` on a
machine with a CUDA device. The CPU side of each path has its own test in the default run
(test_loss.py, test_train_options.py, test_methods.py's quantized rows).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_auto_precision_is_bf16_on_a_bf16_gpu():
    from peftune.train.setup import mixed_precision

    expected = "bf16" if torch.cuda.is_bf16_supported() else "no"
    assert mixed_precision("auto", torch.device("cuda")) == expected


def test_qlora_nf4_trains_on_the_gpu_with_bf16_compute(tiny_model_dir, text_data, tmp_path):
    from peftune.recipe import load_recipe
    from peftune.train.run import run_train

    path = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=text_data["train"],
                        out=tmp_path / "run", quant={"method": "nf4"},
                        train={"max_steps": 8, "precision": "auto"})
    summary = run_train(load_recipe(path), quiet=True)
    losses = [json.loads(line)["loss"] for line in
              (tmp_path / "run/metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert summary["steps"] == 8 and all(loss == loss for loss in losses)  # no NaN
    assert losses[-1] < losses[0]
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()
    from peftune.quant import compute_dtype

    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    recipe = load_recipe(path)
    assert compute_dtype(recipe.quant, torch.device("cuda")) == expected


def test_chunked_loss_equals_the_plain_loss_on_the_gpu():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftune.train.loss import token_loss_sum

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=3000, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True)
    model = get_peft_model(LlamaForCausalLM(config).float(), LoraConfig(
        r=4, target_modules="all-linear", init_lora_weights=False)).cuda()
    ids = torch.randint(3, 3000, (4, 64), device="cuda")
    labels = ids.clone()
    labels[:, :10] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    results = []
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        value = token_loss_sum(model, batch, chunked=chunked)
        value.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(value), grads))
    (plain, plain_grads), (chunked, chunked_grads) = results
    assert chunked == pytest.approx(plain, rel=1e-5)
    for name, grad in plain_grads.items():
        scale = float(grad.abs().max()) or 1.0
        assert float((chunked_grads[name] - grad).abs().max()) <= 1e-4 * scale, name
